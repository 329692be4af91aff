"""An offloaded request's OpenAI body, read the way the daemon's API reads it.

    OffloadRequest.body ─▶ read_body: the API's own pydantic models (api/schemas.py)
                        ─▶ prompt_and_params: the generator's tokenizer, chat template and
                           defaults ─▶ prompt ids + SamplingParams for the decode batch

So a cloud worker serves a body exactly as the device would have, and refuses what the
device would refuse, with the field named (the device relays that as a 400).
"""

from __future__ import annotations

from pydantic import ValidationError

from edge_runtime.api import schemas as s
from edge_runtime.errors import GenerationError, MessageError
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.offload.messages import OffloadRequest
from edge_runtime.serving.request import TextGenerator

Body = s.ChatCompletionRequest | s.CompletionRequest


def read_body(req: OffloadRequest) -> Body:
    """The body validated for its endpoint; MessageError naming the first bad field."""
    model = s.ChatCompletionRequest if req.endpoint == "chat" else s.CompletionRequest
    try:
        return model.model_validate(req.body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise MessageError(f"{where}: {err['msg']}") from None


def prompt_and_params(gen: TextGenerator, body: Body) -> tuple[list[int], SamplingParams]:
    """Prompt ids and sampling parameters by the API's rules (schemas._Sampling): the body's
    values, else the bundle's defaults; GenerationError (its `field` set) otherwise."""
    if isinstance(body, s.ChatCompletionRequest):
        ids = gen.chat_prompt([m.for_template() for m in body.messages])
    else:
        ids = gen.text_prompt(body.prompt_text)
    if not ids:
        raise GenerationError("the prompt encodes to no tokens", "prompt")
    max_tokens, _ = body.requested_max_tokens()
    return ids, body.sampling_params(gen.defaults, gen.resolve_max_tokens(len(ids), max_tokens))
