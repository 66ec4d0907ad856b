# Model Tailor Studio: the dashboard on port 7860, bound to 0.0.0.0, run as uid 1000.
#   CPU:  docker build -t model-tailor-studio .
#         docker run -p 7860:7860 model-tailor-studio
#   GPU:  docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t model-tailor-studio:gpu .
#         docker run --gpus all -p 7860:7860 model-tailor-studio:gpu
# torch's CUDA wheels bring their own CUDA libraries, so the slim base serves both: the host
# needs only the NVIDIA driver and the NVIDIA Container Toolkit. Without a GPU the app uses
# the CPU (MTS_DEVICE=auto).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# torch and its paired torchvision first, from the chosen index (PyPI's torchvision does not
# load beside a CPU torch); requirements.txt then finds both installed
RUN pip install --index-url "$TORCH_INDEX" "torch>=2.4" torchvision
COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt

RUN useradd --create-home --uid 1000 user
USER user
ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH
WORKDIR /home/user/app
COPY --chown=user . .

ENV GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1 MTS_WORKDIR=/home/user/work
EXPOSE 7860
# GET /healthz answers {"status": "ok", "demo": "ready", ...} once the server is up
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GRADIO_SERVER_PORT', '7860'), timeout=4)"
CMD ["python", "app.py"]
