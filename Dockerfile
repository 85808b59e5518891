# segpipe for Ray clusters: one image for the driver (head) and the worker nodes.
#
#   docker build -t my-registry/segpipe:0.1.0 .
#   docker push my-registry/segpipe:0.1.0      # then name it in conf/kuberay-rayjob.yaml
#
# Ray's GPU image brings Python 3.11 and Ray; the pinned versions of everything else come from
# constraints.txt (torch's CUDA 13 build: the nodes' NVIDIA driver must support CUDA 13).
# Pretrained weights are baked in under TORCH_HOME so that no node downloads them; only the
# driver reads them (actors get them through Ray's object store).
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /app
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users segpipe ./segpipe
RUN pip install --no-cache-dir -c constraints.txt . \
    && python -c "import segpipe.encode.encoder as e, numpy as n; e.encode_masks(n.ones((1, 28, 28), n.float32), n.array([[0, 0, 9, 9]], n.float32), 10, 10, 0.5)"
# ^ compiles the mask paste (numba) once, into the image's cache: no encode actor compiles it
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users conf ./conf

ENV TORCH_HOME=/home/ray/models
RUN segpipe weights --download --arch maskrcnn_resnet50_fpn \
    && segpipe weights --download --arch maskrcnn_resnet50_fpn_v2
