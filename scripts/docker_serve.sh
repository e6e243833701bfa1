#!/usr/bin/env bash
# Entry point of the Docker image: `dflare serve` on the GPU, listening on all interfaces.
# DFLARE_TARGET, DFLARE_DRAFT and DFLARE_PORT (set in the Dockerfile, overridable with
# `docker run -e`) name the models and the port; the container's arguments are passed on to
# SGLang as they are, e.g. `--tp-size 2 --mem-fraction-static 0.8`.
set -euo pipefail
exec dflare serve --target "$DFLARE_TARGET" --draft "$DFLARE_DRAFT" --device cuda \
    --port "$DFLARE_PORT" --host 0.0.0.0 "$@"
