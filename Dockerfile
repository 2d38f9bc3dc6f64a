# One image for the operator and the workers (the command picks the role:
# `spantrain operator` or `spantrain worker`). Multi-arch: build with
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/spantrain:0.1.0 .
# On arm64, PyPI's torch wheel is the CPU build, on amd64 the CUDA build (NCCL and the nvidia-*
# wheels included, several GB), so one Dockerfile serves both the GPU nodes and the ARM edge
# boards; SpanTrainJob.spec.images lets a job pick a different image per architecture.
#
# Without Docker or a registry, `scripts/image` builds this file with buildah on a local Debian
# bookworm base (mmdebstrap: python3, python3-venv, tini, ca-certificates) passed as BASE.
#
# Layers, cheapest to invalidate last:
#   1. tini + the non-root user                (depends on BASE only)
#   2. every dependency of .[worker,operator]  (depends on the dependency list in pyproject.toml
#      only: torch is not downloaded again after a code change)
#   3. the project itself, `--no-deps`         (depends on the code)
ARG BASE=python:3.11-slim-bookworm

# The dependency list of .[worker,operator], read from pyproject.toml (tomllib, Python >= 3.11).
# Its own stage, so the main stage's dependency layer changes only when the list does (a new
# pytest marker in pyproject.toml does not download torch again).
FROM ${BASE} AS deps
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c 'import tomllib; p = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]; extra = p["optional-dependencies"]; deps = p["dependencies"] + extra["worker"] + extra["operator"]; print("\n".join(d for d in dict.fromkeys(deps) if not d.startswith(p["name"])))' \
      > /requirements.txt \
 && cat /requirements.txt

FROM ${BASE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# Behind a TLS-intercepting proxy, pass the CA bundle pip should trust at build time only, e.g.
#   --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt
#   -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro   (buildah)
# (scripts/image does this with the host's bundle); neither ends up in the image.
ARG PIP_CERT

# tini reaps the worker's children and forwards SIGTERM, so a pod stops cleanly. The local base
# already has it (and its apt lists are gone), so apt runs only on bases without it.
RUN (command -v tini >/dev/null 2>&1 || { \
        apt-get update \
     && apt-get install -y --no-install-recommends tini \
     && rm -rf /var/lib/apt/lists/*; }) \
 && test -x /usr/bin/tini \
 && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin spantrain

# Dependencies only. The wheels are kept in a cache mount (buildah >= 1.24, BuildKit) as a
# wheelhouse: `pip download` skips files already there, so a rebuild downloads nothing big even
# where pip's HTTP cache stays empty (responses marked uncacheable, e.g. by a proxy).
COPY --from=deps /requirements.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/spantrain \
 && /opt/spantrain/bin/pip download --quiet -d /root/.cache/pip/wheelhouse -r /tmp/requirements.txt \
 && /opt/spantrain/bin/pip install --no-cache-dir --no-index --find-links /root/.cache/pip/wheelhouse \
      -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The project, without touching the dependencies installed above.
COPY pyproject.toml README.md /tmp/src/
COPY planner /tmp/src/planner
COPY worker /tmp/src/worker
COPY operator /tmp/src/operator
COPY testbed /tmp/src/testbed
RUN /opt/spantrain/bin/pip install --no-cache-dir --no-deps /tmp/src \
 && rm -rf /tmp/src \
 && /opt/spantrain/bin/pip check

ENV PATH=/opt/spantrain/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/spantrain
EXPOSE 9400 8080
ENTRYPOINT ["/usr/bin/tini", "--", "spantrain"]
CMD ["--help"]
