"""`hanlin serve`: an OpenAI-compatible server (FastAPI + uvicorn).

One module per endpoint group: chat.py (/v1/chat/completions), completions.py
(/v1/completions), models.py (/v1/models, /health, /metrics); app.py builds the app,
scheduler.py runs the model (continuous batching on the torch engine), settings.py holds
every setting as a flag and an environment variable.
"""
