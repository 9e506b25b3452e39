# enricher: the worker and every other command, as one image (ENTRYPOINT is the `enricher` CLI).
#   docker build -t enricher .
#   docker run --rm enricher --help
#   docker run --rm -v "$PWD/enricher.yaml:/etc/enricher/enricher.yaml:ro" \
#       enricher worker --config /etc/enricher/enricher.yaml
# docker-compose.yml builds it for the sandbox API, the workers and the demo producer.

# --- build: wheels of the package and its runtime dependencies (no dev extra) ----------------
FROM python:3.11-slim AS build
# A compiler for the rare dependency without a wheel for this platform; stays in this stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY enricher ./enricher
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime ---------------------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
# A regular (non-editable) install from the wheels built above, then drop them.
RUN pip install --no-cache-dir --no-index --find-links /wheels enricher \
    && rm -rf /wheels
# Run as an unprivileged user, from a directory it owns (Faust may write a data dir there).
RUN useradd --create-home --home-dir /home/enricher --uid 10001 --user-group enricher
USER enricher
WORKDIR /home/enricher
ENTRYPOINT ["enricher"]
CMD ["--help"]
