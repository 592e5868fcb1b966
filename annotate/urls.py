from django.urls import path

from annotate import views

urlpatterns = [
    path("", views.home, name="home"),
    path("campaigns/<slug:slug>/", views.campaign_detail, name="campaign_detail"),
    path("campaigns/<slug:slug>/label/", views.label, name="label"),
    path("campaigns/<slug:slug>/label/<int:assignment_id>/judge/", views.judge, name="judge"),
    path("campaigns/<slug:slug>/label/<int:assignment_id>/skip/", views.skip, name="skip"),
    path("campaigns/<slug:slug>/label/undo/", views.undo, name="undo"),
    path("campaigns/<slug:slug>/label/acknowledge/", views.acknowledge_warning, name="acknowledge_warning"),
    path("campaigns/<slug:slug>/instructions/", views.instructions, name="instructions"),
    path("campaigns/<slug:slug>/quality/", views.quality, name="quality"),
    path("campaigns/<slug:slug>/export/", views.export, name="export"),
    path("campaigns/<slug:slug>/import/", views.import_pairs_view, name="import_pairs"),
    path("campaigns/<slug:slug>/import/<int:import_id>/", views.import_job, name="import_job"),
]
