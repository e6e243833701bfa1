# Serves a target model with DFLARE speculative decoding on NVIDIA GPUs: the official SGLang
# image of the version dflare_sgl is built against, plus this package and its CUDA kernels.
# SGLang finds the DFLARE algorithm through the package's `sglang.srt.plugins` entry point.
# Build, run and query it: README.md, "Deploy on GPUs".
FROM lmsysorg/sglang:v0.5.23

# GPU architectures of the extension's CUDA kernels. A cubin runs on its own major family
# only: 9.0 Hopper (H100, H200); 10.0 datacenter Blackwell (B200, GB200; B300 runs the sm_100
# cubin); 12.0 RTX Blackwell (RTX PRO 6000, RTX 50xx); +PTX lets newer GPUs JIT-compile the
# kernels. Narrow it for a faster build, e.g.
#   docker build --build-arg TORCH_CUDA_ARCH_LIST=9.0 .
ARG TORCH_CUDA_ARCH_LIST="9.0;10.0;12.0+PTX"
ARG MAX_JOBS=8

# The image's Python is the system one; pip must be allowed to install next to SGLang there.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

WORKDIR /opt/dflare_sgl
COPY setup.py README.md ./
COPY csrc/ csrc/
COPY dflare_sgl/ dflare_sgl/
COPY scripts/install_package.sh scripts/check_install.py scripts/docker_serve.sh scripts/

# The README set-up's install command, run against the image's own torch and SGLang, which it
# leaves as they are (the ARGs above reach it as environment variables). DFLARE_CUDA=1 turns a
# missing CUDA toolchain into a build error instead of a CPU-only extension; the check then
# fails the build unless the CUDA kernels compiled and SGLang's plugin loader knows DFLARE.
RUN DFLARE_CUDA=1 bash scripts/install_package.sh python3 \
    && python3 scripts/check_install.py --cuda --sglang

# SGLang needs no root. The home folder takes the Triton / FlashInfer JIT caches.
RUN useradd --create-home --uid 10001 --shell /bin/bash dflare
USER 10001

# Mount the target and the DFlare draft (local HF folders: nothing is downloaded) at these
# paths, or point the variables elsewhere. Arguments after the image name go to SGLang.
ENV DFLARE_TARGET=/models/target \
    DFLARE_DRAFT=/models/draft \
    DFLARE_PORT=30000
EXPOSE 30000
# Loading a large target and capturing CUDA graphs takes minutes: a long start period.
HEALTHCHECK --start-period=15m --interval=30s --timeout=10s --retries=3 \
    CMD ["sh", "-c", "curl -fsS http://localhost:${DFLARE_PORT}/health || exit 1"]
ENTRYPOINT ["/opt/dflare_sgl/scripts/docker_serve.sh"]
