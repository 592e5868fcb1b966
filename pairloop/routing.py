from django.urls import path

from annotate.consumers import CampaignConsumer
from training.consumers import RoundConsumer

websocket_urlpatterns = [
    path("ws/campaigns/<unislug:slug>/", CampaignConsumer.as_asgi()),
    path("ws/rounds/<int:round_id>/", RoundConsumer.as_asgi()),
]
