# GPU deployment image: dflare_sgl with its CUDA kernels built for Hopper and Blackwell.
#   docker build -t dflare_sgl .
#   docker run --gpus all --rm dflare_sgl dflare generate --target smollm2-135m --device cuda \
#       --prompt "Explain speculative decoding in two sentences."
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    CUDA_HOME=/usr/local/cuda \
    TORCH_CUDA_ARCH_LIST="9.0;10.0" \
    MAX_JOBS=8
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/dflare_sgl
COPY . .
# setup_env.sh installs torch 2.14.1 (sglang 0.5.23's pin), the offline demo target and the
# test dependencies into .venv, then builds the extension (CPU + CUDA kernels).
RUN bash scripts/setup_env.sh
ENV PATH=/opt/dflare_sgl/.venv/bin:$PATH
# Convert the offline SmolLM2 GGUF once at build time so containers start fast.
RUN DFLARE_CACHE=/opt/dflare_cache python -c "from dflare_sgl.target import ensure_smollm2; ensure_smollm2()"
ENV DFLARE_CACHE=/opt/dflare_cache
CMD ["dflare", "--help"]
