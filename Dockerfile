# Hooocus: Fooocus-quality SDXL as a headless service (websocket + HTTP + MCP on one port).
#
#   docker build -t hooocus .
#   docker run --gpus all -p 8188:8188 --stop-timeout 40 \
#     -v hooocus-data:/data \
#     -v "$PWD/tokens.txt:/run/secrets/hooocus_tokens:ro" -e HOOOCUS_TOKENS_FILE=/run/secrets/hooocus_tokens \
#     hooocus [--model NAME]
#
# /data holds models/ (checkpoints, loras, vae, embeddings, prompt_expansion), outputs/ (dated
# folders), history.sqlite3 and an optional hooocus.toml (the working directory). Mount an existing
# models disk at /data/models, or name extra folders with HOOOCUS_CHECKPOINT_DIRS and friends.
# The server runs as uid 10001: a bind-mounted folder must be writable by it.
# No secret is baked in: tokens come at run time from a mounted file (above) or HOOOCUS_TOKENS; on a
# non-loopback address the server refuses to start without them. Give docker stop more time than
# shutdown_grace_s (30 s) so the running job can finish (--stop-timeout 40).

# CUDA 12.8 build of PyTorch (Python 3.11); cu128 also covers Blackwell cards.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# .dockerignore lets only the package sources, pyproject.toml, LICENSE and README.md in.
COPY . /opt/hooocus-src
# torch already satisfies torch>=2.4, so pip keeps the base image's CUDA build. No dev extras.
RUN pip install --no-cache-dir /opt/hooocus-src \
    && rm -rf /opt/hooocus-src \
    && hooocus --help > /dev/null

RUN useradd --create-home --home-dir /home/hooocus --uid 10001 --user-group --shell /usr/sbin/nologin hooocus \
    && mkdir -p /data/models /data/outputs \
    && chown -R hooocus:hooocus /data

ENV HOOOCUS_DATA_DIR=/data \
    HF_HOME=/data/huggingface \
    HOME=/home/hooocus

VOLUME ["/data"]
WORKDIR /data
USER 10001:10001

EXPOSE 8188

# /healthz needs no token and answers 503 while shutting down. If you restrict allowed_hosts, keep
# 127.0.0.1 in the list or this check fails; change the port with HOOOCUS_PORT (not --port) so the
# check follows. The base image has python but no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HOOOCUS_PORT', '8188'), timeout=4)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["hooocus", "serve", "--host", "0.0.0.0"]
