# spkid-search: the CLI, the GPU trial workers and the dashboard in one image.
#   docker build -t spkid-search .        (or let docker-compose.yml build it)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPKID_SEARCH_STUDIES=/app/studies \
    SPKID_SEARCH_CACHE=/app/studies/cache

WORKDIR /app

# Dependencies first (torch is most of the image), so editing the code does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Editable install: the search spaces (spaces/, spaces/baselines/) are found next to the package.
COPY . .
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 app \
    && mkdir -p /app/studies \
    && chown app:app /app/studies

USER app
ENTRYPOINT ["spkid-search"]
CMD ["--help"]
