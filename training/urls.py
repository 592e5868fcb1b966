from django.urls import path

from training import views

urlpatterns = [
    path("campaigns/<unislug:slug>/rounds/", views.campaign_rounds, name="campaign_rounds"),
    path("rounds/<int:round_id>/", views.round_detail, name="round_detail"),
    path("rounds/<int:round_id>/evaluate/", views.round_evaluate, name="round_evaluate"),
    path("rounds/<int:round_id>/to-labelers/", views.round_to_labelers, name="round_to_labelers"),
    path("rounds/<int:round_id>/jobs/<int:job_id>/cancel/", views.job_cancel, name="job_cancel"),
    path("rounds/<int:round_id>/jobs/<int:job_id>/resume/", views.job_resume, name="job_resume"),
]
