# The stand-in for Dockerfile.cuda's base image (pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime) in
# tests, where no container registry can be reached: what Dockerfile.cuda relies on in that image,
# made from Debian bookworm packages and a CPU torch wheel. scripts/container-test.sh builds it on a
# Debian bookworm minbase image that it makes with mmdebstrap (DEBIAN_IMAGE), and then builds
# Dockerfile.cuda on it with --build-arg BASE_IMAGE=<this image>.
#
# What the PyTorch image has and this one has too:
#   python, python3 and pip on PATH, in a prefix that root may pip-install into (the PyTorch image:
#   conda's /opt/conda; here a venv at /opt/venv), Python 3.11, torch preinstalled, apt-get, bash,
#   useradd and getent, CA certificates, running as root.
# What it cannot stand in for: CUDA. Its torch is the CPU build (torch.cuda.is_available() is False),
# so an image built on it proves the build, the non-root run, the output and the clean stop, not the
# CUDA runtime, the driver, or the 2.6.0 build of torch in the real base.
#
# torch is installed from TORCH_PIP_ARGS: on this project's machines a local wheelhouse, bind-mounted
# read-only into the build (podman build -v DIR:DIR:ro, TORCH_PIP_ARGS="--find-links DIR"), so that
# nothing multi-GB is downloaded; elsewhere PyTorch's CPU index.
ARG DEBIAN_IMAGE=localhost/cxr-debian:bookworm
FROM ${DEBIAN_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DEBIAN_IMAGE is a bookworm snapshot made by mmdebstrap: its python3 is 3.11.2. Like the Ubuntu and
# Debian images of a registry (and so the PyTorch image), apt keeps no package caches in a layer.
RUN printf '%s\n' \
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
        'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";' > /etc/apt/apt.conf.d/docker-clean \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3=3.11.* python3-venv=3.11.* \
    && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG TORCH=torch==2.13.0+cpu
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple"
# TORCH_PIP_ARGS is a list of pip options, split into words on purpose; pip is upgraded to one that
# uses the system CA store (truststore), like a current pip in the PyPI-reachable real base.
# hadolint ignore=SC2086,DL3013
RUN python3 -m venv /opt/venv \
    && pip install --upgrade "pip>=24.2" \
    && pip install $TORCH_PIP_ARGS "$TORCH" \
    && python -c 'import torch; print("stand-in base: torch", torch.__version__, "cuda", torch.cuda.is_available())'
