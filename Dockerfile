# fedmoe image: CPU torch by default; pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 for CUDA.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0
COPY pyproject.toml README.md ./
COPY fedmoe fedmoe
COPY server server
COPY clients clients
COPY strategies strategies
RUN pip install --no-cache-dir .
ENTRYPOINT ["fedmoe"]
