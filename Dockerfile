# syntax=docker/dockerfile:1
# One image for every MECBench component; the entry point is the `mecbench` command:
#   mecbench controller|sut-agent|loadgen-agent|node-agent --listen HOST:PORT
# It runs as an unprivileged user (10001) by default. Only the node agent's DaemonSet overrides
# that (runAsUser: 0) for the capabilities shaping needs; deploy/base/node-agent.yaml says why.
#
#   docker build -t ghcr.io/mecbench/mecbench:0.1.0 .

# --- build: wheels for the project and every dependency (compilers stay in this stage) ----------
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mecbench mecbench
COPY controller controller
COPY node_agent node_agent
COPY loadgen_agent loadgen_agent
COPY sut_agent sut_agent
COPY store store
COPY model_server model_server
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: the wheels installed, nothing else ------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The wheels are bind-mounted from the build stage rather than copied, so they take no layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels mecbench \
    && groupadd --gid 10001 mecbench \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/mecbench --shell /usr/sbin/nologin mecbench
USER 10001:10001
WORKDIR /home/mecbench
# gRPC (every component) and the SUT agent's plain-TCP data plane, as the Kubernetes backend uses them.
EXPOSE 50051 50052
ENTRYPOINT ["mecbench"]
CMD ["--help"]
