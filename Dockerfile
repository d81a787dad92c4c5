# The gateway as a slim, non-root container.
#   docker build -t llm-gateway .
#   docker run -p 8080:8080 -v $PWD/config/gateway.yaml:/etc/llm-gateway/gateway.yaml:ro \
#     -e OPENAI_KEY_1 -e ANTHROPIC_KEY_1 llm-gateway
# 8080 is the API (server.port); 9090 the admin listener (admin.port: /metrics, /readyz,
# /status), when the YAML has an `admin` section with host 0.0.0.0. Publish 9090 to your
# monitoring network only. The whole stack: deploy/compose.yaml.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/llm-gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway

COPY config/gateway.example.yaml /etc/llm-gateway/gateway.yaml

USER 10001
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["gateway", "healthcheck", "--url", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/llm-gateway/gateway.yaml"]
