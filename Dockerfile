# syntax=docker/dockerfile:1
# The one image every styletag service runs: `styletag worker`, `styletag db upgrade`, beat, the
# metrics exporter and Flower. Build it with `docker compose build` (see docs/operations.md).
#
# torch's default wheels on Linux x86_64 bundle their CUDA libraries, so a slim Python base is
# enough on a GPU host: the NVIDIA Container Toolkit supplies the driver at run time. For a smaller
# CPU-only image pass PyTorch's CPU wheel index: --build-arg TORCH_INDEX_URL=<index url>.
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}

# The same versions as `make setup` (Makefile: TORCH); tests/ops/test_compose.py keeps them equal.
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged user; its home is the working directory (STYLETAG_HOME=.styletag lands
# there, and so does beat's schedule file).
RUN groupadd --system --gid 10001 styletag \
 && useradd --system --uid 10001 --gid styletag --home-dir /var/lib/styletag --create-home \
        --shell /usr/sbin/nologin styletag

# torch first, in its own layer: it is by far the largest and changes least often.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ${TORCH_SPEC}

WORKDIR /src
COPY pyproject.toml README.md ./
COPY catalog ./catalog
COPY model ./model
COPY worker ./worker
COPY migrations ./migrations
# Flower is an operations tool, not a dependency of the package.
RUN pip install . "flower>=2.0" && rm -rf /src

WORKDIR /var/lib/styletag
USER styletag:styletag
EXPOSE 5555 9108 9109 9110
ENTRYPOINT ["styletag"]
CMD ["--help"]
