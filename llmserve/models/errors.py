from llmserve.errors import LLMServeError


class ModelError(LLMServeError):
    """A model could not be converted or prepared; the message says what to do."""
