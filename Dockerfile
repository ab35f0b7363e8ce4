# syntax=docker/dockerfile:1.7
# The worker image, installed by uv from the lockfile (uv.lock). Two targets:
#   worker (default, last stage)  `voiceclone worker` for the modal and http backends: no torch
#   engine                        adds the `engine` extra (torch, qwen-tts) for the local backend
#
#   docker build -t voiceclone-worker .
#   docker build --target engine -t voiceclone-worker:engine .
#
# Both run as an unprivileged user (uid 10001) and serve /metrics, /healthz and /readyz on 8080
# (VOICECLONE_HTTP__PORT).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# --- build: the locked environment in /app/.venv ------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
# Bytecode compiled at build time (faster start, read-only root filesystem friendly); copy, not
# hard links, because the cache is a mount; the image's own python, never a downloaded one.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
# Dependencies first, from the lockfile alone: this layer survives source edits.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-install-project --no-editable
COPY pyproject.toml uv.lock README.md ./
COPY schemas ./schemas
COPY producer ./producer
COPY consumer ./consumer
COPY modal_app ./modal_app
# The project itself as a regular (non-editable) install: the runtime needs no /src.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-editable

# --- build-engine: the same environment plus the engine extra ------------------------------------
FROM build AS build-engine
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-editable --extra engine

# --- runtime: what both targets share ----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# uid 10001, group 0: also runs under a random uid (OpenShift). /app/var holds local storage and
# (engine) downloaded weights; made here so a volume mounted on it starts out writable.
RUN useradd --uid 10001 --gid 0 --home-dir /app --no-create-home --shell /usr/sbin/nologin \
        voiceclone \
    && mkdir -p /app/var/hf \
    && chown -R 10001:0 /app/var \
    && chmod -R 0775 /app/var
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
EXPOSE 8080
ENTRYPOINT ["voiceclone"]
CMD ["worker"]

# --- engine: the local backend (torch, qwen-tts; CUDA wheels from the lockfile) ----------------
FROM runtime AS engine
# The libraries the engine's audio stack loads, as in the Modal image (modal_app/app.py).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libsndfile1=1.2.* sox=14.4.* ffmpeg=7:5.* \
    && rm -rf /var/lib/apt/lists/*
# Weights downloaded at run time land in a writable place (mount a volume here to keep them).
ENV HF_HOME=/app/var/hf
COPY --from=build-engine /app/.venv /app/.venv
USER 10001

# --- worker (default): the small image ---------------------------------------------------------
FROM runtime AS worker
COPY --from=build /app/.venv /app/.venv
USER 10001
