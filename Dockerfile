# One image for the operator and the workers (the command picks the role:
# `spantrain operator` or `spantrain worker`). Multi-arch: build with
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/spantrain:0.1.0 .
# On arm64, PyPI's torch wheel is the CPU build, on amd64 the CUDA build (NCCL included), so one
# Dockerfile serves both the GPU nodes and the ARM edge boards; SpanTrainJob.spec.images lets a
# job pick a different image per architecture.
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY planner planner
COPY worker worker
COPY operator operator
RUN python -m venv /opt/spantrain \
 && /opt/spantrain/bin/pip install --upgrade pip \
 && /opt/spantrain/bin/pip install ".[worker,operator]"

FROM python:3.11-slim-bookworm
# tini reaps the worker's children and forwards SIGTERM, so a pod stops cleanly
RUN apt-get update && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin spantrain
COPY --from=build /opt/spantrain /opt/spantrain
ENV PATH=/opt/spantrain/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/spantrain
EXPOSE 9400 8080
ENTRYPOINT ["/usr/bin/tini", "--", "spantrain"]
CMD ["--help"]
