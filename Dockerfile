# The segsearch image for Ray clusters (cluster/aws-gpu.yaml, cluster/kuberay/*.yaml): Ray's own
# image (Python, Ray, the `ray` user, bash and wget that the cluster launcher and KubeRay expect),
# torch's CPU or CUDA build, and segsearch with its dependencies. From the repository root:
#
#   docker build -t segsearch:0.1.0-cpu .                           # CPU: heads, CPU-only clusters
#   docker build -t segsearch:0.1.0-gpu --build-arg VARIANT=gpu .   # CUDA: GPU workers
#
# Pinned like the package: Ray at the minor pyproject.toml allows, torch as .ci/run installs it,
# the Python CI tests (tests/test_packaging.py checks all three).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG VARIANT=cpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}

ARG RAY_VERSION
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# PyPI's Linux torch is the CUDA build (its CUDA libraries come as wheels; the host needs only the
# NVIDIA driver); the CPU build, without them, is much smaller.
RUN if [ "$VARIANT" = gpu ]; then \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "$TORCH_CPU_INDEX"; \
    fi

COPY --chown=ray:users pyproject.toml README.md /tmp/segsearch/
COPY --chown=ray:users search_spaces /tmp/segsearch/search_spaces
COPY --chown=ray:users segsearch /tmp/segsearch/segsearch

# Ray and torch stay the versions above; `aws` adds boto3 for MLflow artifacts on s3:// roots.
RUN pip install --no-cache-dir "/tmp/segsearch[aws]" \
        "ray[default,tune,train,data]==${RAY_VERSION}" "torch==${TORCH_VERSION}" \
    && rm -rf /tmp/segsearch \
    && segsearch --version
