# lmproxy's image: `docker build -t lmproxy .` (docs/operations.md#the-image).
# The build stage installs lmproxy as README's quick start does, into a virtual
# environment that the runtime stage copies whole; the runtime stage has no compiler,
# no pip cache, no sources and no tests, and runs as a user that is not root.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lmproxy ./lmproxy
COPY strategies ./strategies
RUN python -m venv /opt/lmproxy
ENV PATH=/opt/lmproxy/bin:$PATH
RUN pip install .

FROM python:${PYTHON_VERSION}-slim AS runtime
COPY --from=build /opt/lmproxy /opt/lmproxy
ENV PATH=/opt/lmproxy/bin:$PATH PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin lmproxy
USER 10001:10001
EXPOSE 8000
# The slim image has no curl: Python asks /liveness (200 while the process serves).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/liveness', timeout=2)"]
ENTRYPOINT ["lmproxy"]
# Without arguments, the built-in demo backends; give --backend URLs or --config.
CMD ["--demo"]
