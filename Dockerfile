# syntax=docker/dockerfile:1
# feature-gateway: a slim image that runs as an unprivileged user.
#   docker build -t feature-gateway .
#   docker run -p 127.0.0.1:8000:8000 -e GATEWAY_API_KEYS='[...]' feature-gateway
# Dependencies are the exact versions of requirements.lock (refresh it with scripts/lock); the build stage
# makes a virtualenv from wheels only (no compiler in the image) and the runtime stage copies just that.
# For production, pin the base image by digest too: PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/feature-gateway
COPY requirements.lock /tmp/requirements.lock
RUN /opt/feature-gateway/bin/pip install --only-binary=:all: --requirement /tmp/requirements.lock
COPY pyproject.toml README.md /src/
COPY app /src/app
COPY routers /src/routers
COPY backends /src/backends
# --no-deps: every dependency is already there, at its locked version; the check proves the install runs.
RUN /opt/feature-gateway/bin/pip install --no-deps --no-build-isolation /src \
 && /opt/feature-gateway/bin/feature-gateway check /src/app/demo/registry.yaml

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/feature-gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/feature-gateway --no-create-home \
        --shell /usr/sbin/nologin gateway \
 && install -d -o gateway -g gateway -m 0750 /var/lib/feature-gateway
COPY --from=build /opt/feature-gateway /opt/feature-gateway
COPY docker/registry.yaml /etc/feature-gateway/registry.yaml
# Numeric, so that a runtime that refuses root images (Kubernetes runAsNonRoot) can verify it.
USER 10001:10001
WORKDIR /var/lib/feature-gateway
EXPOSE 8000
# /healthz: the process answers. A backend that is down is /readyz's business (the gateway keeps serving
# its other backends), so it does not make the container unhealthy. Python: the slim image has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["feature-gateway"]
CMD ["serve", "--host", "0.0.0.0", "--registry", "/etc/feature-gateway/registry.yaml"]
