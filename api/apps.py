from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "api"
    verbose_name = "HTTP API"

    def ready(self):
        # These import the models: only once the app registry is ready.
        from annotate.actions import queue_emptied
        from api import webhooks
        from training.live import job_state_changed

        job_state_changed.connect(webhooks.on_job_state_changed, dispatch_uid="api-webhooks-jobs")
        queue_emptied.connect(webhooks.on_queue_emptied, dispatch_uid="api-webhooks-queue")
