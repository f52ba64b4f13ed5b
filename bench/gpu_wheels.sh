#!/usr/bin/env bash
# The server's pure-Python needs that the lent GPU machine lacks (its image has torch, timm, numpy, pillow,
# safetensors, prometheus-client, httpx, anyio, h11, click, typing-extensions, uvloop; not fastapi, starlette,
# pydantic(-settings), uvicorn, python-multipart), as cp312 wheels in .gpu/whl (ignored by git; carried by
# the `run` call that runs bench.gpu_plan). Versions: those of this project's CI environment. About 4 MB.
#
#     bash bench/gpu_wheels.sh            # from the repository root, once, on a machine with pip and the index
set -euo pipefail
dest=${1:-.gpu/whl}
mkdir -p "$dest"
py=${PYTHON:-python3}
"$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 \
  python-dotenv==1.2.4 uvicorn==0.55.0 python-multipart==0.0.34 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 annotated-doc==0.0.7
ls -la "$dest"
