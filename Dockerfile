# The fmfl-flwr app image: Flower's SuperExec with the app's dependencies installed.
#
# Why: in the Docker deployment (deploy/compose.yaml) ServerApps and ClientApps run in
# SuperExec containers. `flwr run` ships the app's code to them as a FAB, but the libraries
# it imports (torch, diffusers, flwr-datasets, ...) must already be in the image. The base is
# pinned to the flwr version pyproject.toml pins, and the install step is the one CI runs
# (.ci/run), so containers get the environment the tests passed in.
#
# Build from the repository root:  docker build -t fmfl-flwr-superexec:0.1.0 .
FROM flwr/superexec:1.42.0

WORKDIR /app
COPY --chown=app:app pyproject.toml README.md server_app.py client_app.py ./
COPY --chown=app:app fmfl_flwr ./fmfl_flwr
COPY --chown=app:app strategies ./strategies
RUN pip install -q -e ".[test]"

ENTRYPOINT ["flower-superexec"]
