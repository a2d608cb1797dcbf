# neuroserve: the HTTP server (default command) and the fine-tuning worker (`worker`), CPU only.
#
#   docker build -t neuroserve:0.1.0 .
#   docker run --rm -p 8000:8000 -v neuroserve-models:/models neuroserve:0.1.0
#
# The model repository lives in the volume /models (NEUROSERVE_MODEL_REPOSITORY). A new named
# volume starts with the built-in models copied in at build time; published versions persist.
# For reproducible builds pin the base image by digest as well (python:3.11.11-slim-bookworm@sha256:...).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- build: a virtual environment with CPU torch and neuroserve -----------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# torch first, in its own layer: by far the largest download, and it changes least often.
# constraints-cpu.txt pins the version; the CPU index serves the CPU-only build of it.
COPY constraints-cpu.txt ./
RUN pip install -c constraints-cpu.txt torch

COPY pyproject.toml README.md ./
COPY models ./models
COPY calibration ./calibration
COPY hardware_backends ./hardware_backends
COPY service ./service
RUN pip install -c constraints-cpu.txt . \
    && neuroserve --help > /dev/null

# The built-in models shipped inside the package become the initial model repository.
RUN python -c "import pathlib, shutil, importlib.util; \
src = pathlib.Path(importlib.util.find_spec('models').origin).parent / 'artifacts'; \
dst = pathlib.Path('/models'); dst.mkdir(); \
src.is_dir() and shutil.copytree(src, dst, dirs_exist_ok=True)"

# ---- runtime: the virtual environment, the models, a non-root user --------------------------
FROM ${PYTHON_IMAGE}
ARG UID=10001
RUN groupadd --system --gid "${UID}" neuroserve \
    && useradd --system --uid "${UID}" --gid neuroserve --create-home \
       --home-dir /home/neuroserve --shell /usr/sbin/nologin neuroserve

COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=neuroserve:neuroserve /models /models

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NEUROSERVE_MODEL_REPOSITORY=/models \
    NEUROSERVE_PORT=8000
VOLUME ["/models"]

USER neuroserve
WORKDIR /home/neuroserve
# 8000: the HTTP API and /metrics; 9100: /metrics of `neuroserve worker`.
EXPOSE 8000 8001 9100

# slim images have no curl: probe with the interpreter that is there anyway.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('NEUROSERVE_PORT', '8000') + '/v2/health/live', timeout=4)"]

ENTRYPOINT ["neuroserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
