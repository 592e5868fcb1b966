from django.urls import path

from annotate import views

urlpatterns = [
    path("", views.home, name="home"),
    path("campaigns/<unislug:slug>/", views.campaign_detail, name="campaign_detail"),
    path("campaigns/<unislug:slug>/label/", views.label, name="label"),
    path("campaigns/<unislug:slug>/label/<int:assignment_id>/judge/", views.judge, name="judge"),
    path("campaigns/<unislug:slug>/label/<int:assignment_id>/skip/", views.skip, name="skip"),
    path("campaigns/<unislug:slug>/label/undo/", views.undo, name="undo"),
    path("campaigns/<unislug:slug>/label/acknowledge/", views.acknowledge_warning, name="acknowledge_warning"),
    path("campaigns/<unislug:slug>/instructions/", views.instructions, name="instructions"),
    path("campaigns/<unislug:slug>/quality/", views.quality, name="quality"),
    path("campaigns/<unislug:slug>/export/", views.export, name="export"),
    path("campaigns/<unislug:slug>/import/", views.import_pairs_view, name="import_pairs"),
    path("campaigns/<unislug:slug>/import/<int:import_id>/", views.import_job, name="import_job"),
    path("campaigns/<unislug:slug>/ai-labelers/<int:labeler_id>/", views.ai_labeler_card, name="ai_labeler"),
    path("campaigns/<unislug:slug>/ai-labelers/<int:labeler_id>/start/", views.ai_labeler_start,
         name="ai_labeler_start"),
    path("campaigns/<unislug:slug>/ai-labelers/<int:labeler_id>/stop/", views.ai_labeler_stop,
         name="ai_labeler_stop"),
    path("campaigns/<unislug:slug>/eval-sets/", views.eval_sets_view, name="eval_sets"),
]
