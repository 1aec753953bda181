# One image for web and workers. The PyPI torch wheel carries its own CUDA libraries, so the
# same image runs on a GPU host (with the NVIDIA container toolkit) and on CPU-only hosts.
FROM node:20-bookworm-slim AS assets
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund

FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STUDIO_DATA_DIR=/data STUDIO_MEDIA_ROOT=/media
# ffmpeg: Gradio encodes the synthesis page's streamed audio with it.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ffmpeg \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml ./
COPY studio ./studio
COPY training ./training
COPY synthesis ./synthesis
RUN pip install .
COPY . .
COPY --from=assets /src/node_modules ./node_modules
RUN useradd --create-home --uid 1000 studio && mkdir -p /data /media && chown studio /data /media
USER studio
RUN SECRET_KEY=build-only python manage.py collectstatic --noinput -v 0
EXPOSE 8000
CMD ["sh", "-c", "python manage.py migrate --noinput && python -m uvicorn studio.asgi:application --host 0.0.0.0 --port 8000 --lifespan off --ws websockets --ws-max-size 65536 --proxy-headers --no-server-header"]
