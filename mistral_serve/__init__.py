"""mistral-serve: serving Mistral-family LLMs on Ray Serve with our own continuous-batching engine."""

from mistral_serve.engine.args import EngineArgs
from mistral_serve.engine.llm import LLM
from mistral_serve.engine.outputs import CompletionOutput, RequestOutput
from mistral_serve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput"]
