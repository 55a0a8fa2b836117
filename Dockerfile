# rayuda's node image: the locked environment (CUDA torch from requirements.lock: PyPI's CUDA wheels bring their
# CUDA libraries, the host brings the NVIDIA driver and the container toolkit) with rayuda installed, so a new
# Ray node runs trials as soon as it pulls the image instead of pip-installing several GB first.
#
#   docker build -t rayuda --build-arg RAYUDA_GIT_COMMIT=$(git rev-parse HEAD) \
#       --build-arg RAYUDA_GIT_DIRTY=$(git diff --quiet HEAD && echo false || echo true) .
#
# Used by cluster.yaml's `docker:` section (Ray's cluster launcher) and deploy/rayjob.yaml (KubeRay). Layout =
# what both expect: user `ray` (uid 1000, KubeRay's convention), the environment in ~/venv (the path
# cluster.yaml's commands use), the code in ~/rayuda (installed editable, so a synced checkout replaces it),
# rsync (the launcher syncs files into the container with it), wget (KubeRay's health probes), iproute2 and
# socat (cluster.yaml's MLflow commands on the head). Ray's dashboard extras (`ray[default]`, job submission)
# and boto3 (the AWS autoscaler) are added at the lock's ray version: they are not in the lock.
FROM python:3.11-slim-bookworm

RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends rsync openssh-client wget iproute2 socat procps \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --shell /bin/bash ray
USER ray
WORKDIR /home/ray
ENV PATH=/home/ray/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# the environment first (its layer is reused while only the code changes); the lock is kept beside it, so
# cluster.yaml's setup command skips the install when the synced lock is the same
COPY --chown=ray:ray requirements.lock /home/ray/venv-lock/requirements.lock
RUN python -m venv /home/ray/venv \
    && pip install -q -r /home/ray/venv-lock/requirements.lock \
    && RAY_VERSION=$(sed -n 's/^ray==//p' /home/ray/venv-lock/requirements.lock) \
    && pip install -q "ray[default]==${RAY_VERSION}" "boto3>=1.34" \
    && cp /home/ray/venv-lock/requirements.lock /home/ray/venv/requirements.lock

COPY --chown=ray:ray . /home/ray/rayuda
RUN pip install -q --no-deps -e /home/ray/rayuda \
    && python -c "import rayuda, torch, torchvision, ray, mlflow, optuna; print('rayuda', rayuda.__version__, 'torch', torch.__version__)"

# provenance without .git in the image (rayuda.provenance reads these when it runs from no checkout)
ARG RAYUDA_GIT_COMMIT=""
ARG RAYUDA_GIT_DIRTY=""
ENV RAYUDA_GIT_COMMIT=${RAYUDA_GIT_COMMIT} RAYUDA_GIT_DIRTY=${RAYUDA_GIT_DIRTY}

WORKDIR /home/ray/rayuda
CMD ["python", "-m", "rayuda.tune", "--help"]
