"""Every server setting is a CLI flag (`hanlin serve --max-concurrent 8`) and an environment
variable (`HANLIN_SERVE_MAX_CONCURRENT=8`); a flag wins over the environment."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HANLIN_SERVE_", extra="forbid")

    model: str = Field("smollm2-135m-instruct", description="model name from `hanlin models`, a .gguf file or a HF folder")
    engine: str | None = Field(None, description="engine (default: torch where it can run the model, for continuous batching)")
    device: str = Field("auto", description="device: auto, cpu, cuda[:N], npu[:N], mps")
    dtype: str = Field("auto", description="torch engine dtype: auto, float32, bfloat16, float16")
    ctx_size: int | None = Field(None, ge=16, description="context window per request (default: the model's, capped)")
    embedding_model: str | None = Field(None, description="sentence-embedding model for /v1/embeddings: all-minilm-l6-v2 or a folder")
    kb: str | None = Field(None, description="a knowledge base folder (`hanlin kb ingest`) for /v1/kb/search, /v1/kb/ask and the agents' search tool")
    served_model_name: str | None = Field(None, description="the model id clients use (default: the model's name)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="accepted API keys, comma-separated (none: no auth)")
    max_concurrent: int = Field(8, ge=1, le=256, description="requests decoded at once (batch slots)")
    queue_size: int = Field(64, ge=0, description="requests that may wait for a slot; beyond it: 429")
    max_tokens_cap: int = Field(2048, ge=1, description="upper bound on max_tokens of any request")
    request_timeout: float = Field(600.0, gt=0, description="seconds a request may take before it is cut off")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="origins allowed by CORS, comma-separated")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted (413 beyond)")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
