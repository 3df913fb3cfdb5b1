"""The project's original contract and TGI's: `POST /generate` and `POST /generate_stream`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from ..errors import APIError
from ..grammar import generate_grammar, tgi_grammar
from ..schemas import (
    GenerateRequest,
    GenerateResponse,
    TGIDetails,
    TGIError,
    TGIGenerateResponse,
    TGIParameters,
    TGIToken,
)
from ..service import Service, get_service
from ..streams import SSE_HEADERS, STREAMED, tgi_events
from ..timeouts import TimedEventSourceResponse

TGI_DEFAULT_MAX_NEW_TOKENS = 100

router = APIRouter(tags=["original / TGI"],
                   responses={code: {"model": TGIError} for code in (400, 401, 413, 422, 424, 429, 503)})


async def tgi_request(svc: Service, body: GenerateRequest):
    """(prompt ids, SamplingParams, TGI parameters or None for the original contract, prompt text)."""
    if body.inputs is not None and body.prompt is not None:
        raise APIError(None, "send either prompt (original API) or inputs (TGI API), not both", param="prompt")
    if body.inputs is None:
        if body.prompt is None:
            raise APIError(None, "prompt is required (or TGI's inputs)", param="prompt")
        if body.chat:
            ids = await svc.chat_ids([{"role": "user", "content": body.prompt}])
        else:
            ids = await svc.encode(body.prompt)
        params = svc.sampling(len(ids), body.max_tokens, stop=body.stop, temperature=body.temperature,
                              top_p=body.top_p, top_k=body.top_k, seed=body.seed, speculate=body.speculate,
                              tree=body.tree)
        params.grammar = await svc.compile_grammar(generate_grammar(body.json_schema, body.regex), "json_schema")
        return ids, params, None, body.prompt
    p = body.parameters or TGIParameters()
    if p.decoder_input_details:
        raise APIError(400, "decoder_input_details is not supported: the prompt's log-probabilities are not "
                            "computed (details.tokens[].logprob and top_n_tokens are)", param="decoder_input_details")
    ids = await svc.encode(body.inputs)
    temperature = p.temperature if p.temperature is not None else (1.0 if p.do_sample else 0.0)
    params = svc.sampling(len(ids), p.max_new_tokens or TGI_DEFAULT_MAX_NEW_TOKENS, name="max_new_tokens",
                          stop=p.stop, temperature=temperature, top_p=p.top_p or 1.0, top_k=p.top_k or 0,
                          seed=p.seed, speculate=p.speculate if p.speculate is not None else body.speculate,
                          tree=p.tree or body.tree, logprobs=p.details or bool(p.top_n_tokens),
                          top_logprobs=p.top_n_tokens or 0)
    params.grammar = await svc.compile_grammar(tgi_grammar(p.grammar), "grammar")
    return ids, params, p, body.inputs


@router.post("/generate", response_model=GenerateResponse | TGIGenerateResponse)
async def generate(body: GenerateRequest, request: Request, svc: Service = Depends(get_service)):
    """Original contract `{"prompt", "max_tokens"}` -> `{"response", ...}`; TGI `{"inputs", "parameters"}`
    -> `{"generated_text", "details"}`."""
    if body.stream:
        raise APIError(None, "stream is not supported on /generate: use /generate_stream (or POST /)",
                       param="stream")
    ids, params, tgi, prompt = await tgi_request(svc, body)
    fin = await svc.result(svc.submit(ids, params, request.url.path), request)
    if (err := svc.failure(fin, openai=False)) is not None:
        raise err
    if tgi is None:
        return GenerateResponse(response=fin.text, finish_reason=fin.finish_reason,
                                prompt_tokens=fin.prompt_tokens, completion_tokens=fin.completion_tokens,
                                steps=fin.steps, mean_accepted=round(fin.mean_accepted, 4))
    details = None
    if tgi.details:
        log = svc.token_log()
        pieces = [log.tgi(entry) for entry in fin.logprobs]
        top_tokens = [[TGIToken(**t) for t in top] for _, top in pieces] if tgi.top_n_tokens else None
        details = TGIDetails(finish_reason=fin.finish_reason, generated_tokens=fin.completion_tokens,
                             seed=tgi.seed, tokens=[TGIToken(**token) for token, _ in pieces], top_tokens=top_tokens)
    return TGIGenerateResponse(generated_text=(prompt if tgi.return_full_text else "") + fin.text,
                               details=details)


@router.post("/generate_stream", response_class=EventSourceResponse)
async def generate_stream(body: GenerateRequest, request: Request, svc: Service = Depends(get_service)):
    """TGI's token stream (SSE): one event per token; the last one carries `generated_text` and
    `details.finish_reason`. Errors after the stream started arrive as `{"error", "error_type"}`."""
    ids, params, tgi, prompt = await tgi_request(svc, body)
    handle = svc.submit(ids, params, request.url.path)
    prefix = prompt if tgi is not None and tgi.return_full_text else ""
    seed = tgi.seed if tgi is not None else body.seed
    log = svc.token_log() if params.logprobs else None
    return TimedEventSourceResponse(tgi_events(svc, handle, params.max_tokens, prefix, seed, log),
                                    headers=SSE_HEADERS, send_timeout=svc.settings.send_timeout)


@router.post("/", response_model=GenerateResponse | TGIGenerateResponse, responses=STREAMED)
async def tgi_root(body: GenerateRequest, request: Request, svc: Service = Depends(get_service)):
    """TGI's compatibility route (huggingface_hub's `InferenceClient(model=URL).text_generation` posts here):
    `stream: true` answers like `/generate_stream`, otherwise like `/generate`."""
    if body.stream:
        return await generate_stream(body, request, svc)
    return await generate(body, request, svc)
