# The tma-backup worker image: Celery worker, beat and Flower all run from it (see docker-compose.yml).
#
# No image registry is reachable here, so the base is imported locally and the build needs BuildKit
# (for the secret mount). Build with docker/images/worker/build.sh, which first makes the base
# (debootstrap + docker import: Debian 13, python3 3.13, python3-venv, restic, zstd, tini, and the client
# tools of PG_CLIENT_MAJOR in docker/images/common.sh, the newest PostgreSQL we support: 18, first on the
# base's PATH; the base's label org.tma.pg-client-major says which, and this image inherits it) and then
# runs, from the repository root:
#   DOCKER_BUILDKIT=1 docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt \
#     -t tma-local/tma-backup-worker:latest .
# The CA bundle that pip needs to reach PyPI is mounted for the pip steps only: it is in no layer.
ARG BASE_IMAGE=tma-local/worker-base:latest
FROM ${BASE_IMAGE}

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1

# A non-root user (uid 1000) owns /backups, so a fresh named volume mounted there is writable by it.
RUN groupadd --gid 1000 tma \
 && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin tma \
 && install -d -o tma -g tma -m 0700 /backups \
 && python3 -m venv /opt/venv

# 1. The dependencies named in pyproject.toml, alone: this layer is rebuilt only when that file changes.
RUN --mount=type=bind,source=pyproject.toml,target=/tmp/build/pyproject.toml \
    --mount=type=secret,id=pip_cert \
    test -s /run/secrets/pip_cert || { echo "build secret pip_cert (a CA bundle) is missing" >&2; exit 1; }; \
    python3 -c "import tomllib; p = tomllib.load(open('/tmp/build/pyproject.toml', 'rb')); print('\n'.join(p['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && PIP_CERT=/run/secrets/pip_cert pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 2. The project itself from the build context (a bind mount: no copy of the tree stays in a layer).
RUN --mount=type=bind,source=.,target=/src,rw \
    --mount=type=secret,id=pip_cert \
    cd /src \
 && PIP_CERT=/run/secrets/pip_cert pip install --no-deps . \
 && pip check \
 && pip freeze > /opt/venv/pip-freeze.txt

LABEL org.opencontainers.image.title=tma-local/tma-backup-worker
USER 1000:1000
WORKDIR /home/tma
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["celery", "-A", "worker", "worker", "-E", "--loglevel=INFO"]
