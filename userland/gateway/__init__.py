"""The OpenAI-compatible HTTP gateway (`llmos serve`): a userland program on the AsyncClient."""
