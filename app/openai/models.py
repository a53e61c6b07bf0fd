"""The one model this server serves, by the name the OpenAI-shaped routes use."""

from __future__ import annotations

import time

from app.openai import schemas
from app.openai.errors import OpenAIError

_STARTED = int(time.time())


class ServedModel:
    def __init__(self, name: str) -> None:
        self.name = name  # KVTHREADS_MODEL_NAME, else the loaded model's name

    def check(self, requested: str, param: str = "model") -> None:
        if requested != self.name:
            raise OpenAIError.not_found(
                f"The model `{requested}` does not exist; this server serves `{self.name}`",
                param=param,
                code="model_not_found",
            )

    def list(self) -> schemas.ModelList:
        return schemas.ModelList(data=[self.get(self.name)])

    def get(self, model: str) -> schemas.Model:
        self.check(model)
        return schemas.Model(id=self.name, created=_STARTED)
