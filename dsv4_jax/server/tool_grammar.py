"""llguidance grammars for ``response_format`` and ``tool_choice`` (constrained decoding).

The engine masks each step's logits with an llguidance matcher (engine/constraints.py);
this module writes the grammars, as serialized llguidance grammars (``str``) built from
Lark text (llguidance's dialect: ``%json {schema}`` embeds a JSON schema, ``</think>``
names a special token, ``A & ~B`` intersects / negates terminals).

* ``json_grammar(schema)``: ``response_format`` ``json_object`` (schema None: any JSON
  object) and ``json_schema``.
* ``tool_call_grammar(tools, choice, thinking)``: DeepSeek-V4's DSML tool calls
  (``tool_parser`` has the format). ``"required"`` or a function name: the reply is exactly
  one block of one or more invokes (one with ``parallel=False``) of the tools (of that
  one), ``"\\n\\n<｜DSML｜tool_calls>"`` … ``"\\n</｜DSML｜tool_calls>"``, then EOS; the
  leading blank line is required because the reference encoder renders it even with empty
  content, so that is what the model was trained to write (``tool_parser`` drops it).
  ``"auto"``: free content that may end, or be followed by one block; invokes of functions
  with ``"strict": true`` follow their schema, other functions' invokes are any well-formed
  DSML; without strict functions there is nothing to constrain (None).
* Thinking mode: first reasoning (any text without ``</think>`` or ``｜DSML｜``), then the
  ``</think>`` token, then the reply as above.

Inside an invoke (required / named / strict): the schema's properties only (OpenAI strict
semantics: no extra keys), each at most once, in the schema's property order (the order
the encoder renders arguments in; any order would need a permutation grammar), the
``required`` ones present; a schema without ``properties`` (and without
``additionalProperties: false``) takes any parameters. A property whose schema allows only
strings is raw text with ``string="true"`` (``enum`` / ``const`` give the literals; other
string keywords are not enforced on raw text); one that allows no string is ``%json
{subschema}`` with ``string="false"``, in the encoder's compact form (``", "``, ``": "``,
no other whitespace); one that allows both may take either form. No value may contain
``｜DSML｜`` (the parser would end it at a ``</｜DSML｜parameter>``): raw text excludes it,
and a pattern keeps it out of JSON strings (not out of the keys of free-form objects).
Local ``$ref``s work: the root's ``$defs`` / ``definitions`` go with each subschema.
Keywords llguidance does not implement are errors for strict functions, ignored for others.

llguidance lexes greedily without backtracking, so two literals that can follow the same
point must never be a prefix of one another: every tag literal here begins with its
newline (``"\\n<｜DSML｜parameter …>"`` against ``"\\n</｜DSML｜invoke>"``), a raw value's
terminal includes its closing tag, and free content before a block is one terminal with
the block's opener.

Schemas that llguidance cannot compile raise ``GrammarError`` naming where the schema is
(``tools[1].function.parameters.properties.days: …``): the server answers 400.
``compile_matcher`` builds the matcher for a grammar and a ``tokenizers.Tokenizer``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import llguidance

from dsv4_jax.server.encoding import DSML, EOS
from dsv4_jax.server.tool_schema import resolve_ref, value_kind


class GrammarError(ValueError):
    """A schema or tool definition that cannot become a grammar; the message names it."""


# DSML parameters carry compact JSON, as the reference encoder's json.dumps writes it.
_DSML_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_NO_DSML = f"~/(?s:.*){DSML}(?s:.*)/"
# JSON strings inside a string="false" value must not contain ｜DSML｜ either (the parser
# would take a "</｜DSML｜parameter>" in one for the value's end). JSON-schema patterns
# have no negation: this is the complement of ".*｜DSML｜.*" spelled out (a run of ｜, then
# a partial "DSML" broken by another character, or the end).
_B, _LOOP = DSML[0], f"(?:{DSML[0]}|D{DSML[0]}|DS{DSML[0]}|DSM{DSML[0]})*"
_WITHOUT_DSML = (
    f"^(?:[^{_B}]|{_B}{_LOOP}(?:[^{_B}D]|D[^{_B}S]|DS[^{_B}M]|DSM[^{_B}L]|DSML[^{_B}]))*"
    f"(?:{_B}{_LOOP}(?:D(?:S(?:M(?:L)?)?)?)?)?$"
)
_ANY_JSON = {  # any JSON value, its strings without ｜DSML｜ (object keys are not checked)
    "$defs": {
        "v": {
            "anyOf": [
                {"type": ["null", "boolean", "number"]},
                {"type": "string", "pattern": _WITHOUT_DSML},
                {"type": "array", "items": {"$ref": "#/$defs/v"}},
                {"type": "object", "additionalProperties": {"$ref": "#/$defs/v"}},
            ]
        }
    },
    "$ref": "#/$defs/v",
}
_SUBSCHEMAS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA = ("items", "additionalProperties", "contains", "additionalItems")
_SUBLISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_TERMINALS = f"""
REASONING: /(?s:.*)/ & ~/(?s:.*)(<\\/think>|{DSML})(?s:.*)/
TEXT: /(?s:.*)/ & {_NO_DSML}
RAW: TEXT "</{DSML}parameter>"
HEAD: TEXT "\\n\\n<{DSML}tool_calls>"
KEY: /[^"<\\n\\uff5c]+/
"""


def _no_markup(schema: Any) -> Any:
    """``schema`` with every string it allows kept free of ``｜DSML｜`` (a pattern added,
    or intersected through ``allOf``); enums, consts and formats are left alone."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in _SUBSCHEMAS:
        if isinstance(out.get(k), dict):
            out[k] = {n: _no_markup(v) for n, v in out[k].items()}
    for k in _SUBSCHEMA:
        if isinstance(out.get(k), dict):
            out[k] = _no_markup(out[k])
    for k in _SUBLISTS:
        if isinstance(out.get(k), list):
            out[k] = [_no_markup(v) for v in out[k]]
    t = out.get("type")
    stringy = t is None or t == "string" or (isinstance(t, list) and "string" in t)
    if stringy and not any(k in out for k in ("enum", "const", "format", "$ref")):
        if "pattern" in out:
            out["allOf"] = [*out.get("allOf", []), {"pattern": _WITHOUT_DSML}]
        else:
            out["pattern"] = _WITHOUT_DSML
    return out


def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _with(schema: Any, options: dict | None) -> Any:
    """``schema`` with llguidance's JSON options (its own ``x-guidance`` wins)."""
    if not isinstance(schema, dict) or not options:
        return schema
    return {**schema, "x-guidance": {**options, **schema.get("x-guidance", {})}}


def _json(schema: Any, options: dict | None = None) -> str:
    return "%json " + json.dumps(_with(schema, options))


def _check(grammar: str, where: str) -> None:
    is_error, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"{where}: {msgs[0] if msgs else 'does not compile'}")


def _check_schema(schema: Any, where: str, options: dict | None = None) -> None:
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"{where}: a JSON schema must be an object")
    _check(llguidance.LLMatcher.grammar_from_json_schema(_with(schema, options)), where)


def json_grammar(
    schema: dict | None,
    *,
    thinking: bool = False,
    lenient: bool = False,
    where: str = "response_format.json_schema.schema",
) -> str:
    """The reply is one JSON value matching ``schema`` (None: any JSON object); in thinking
    mode after reasoning and ``</think>``. ``lenient`` ignores keywords llguidance does not
    implement (else they are an error). Whitespace is fixed (``", "`` / ``": "``, nothing
    else), as in DSML arguments: a sampled reply cannot spend its token budget on blank runs
    between values, and every reply is the canonical form of its value."""
    schema = {"type": "object"} if schema is None else schema
    options = {**_DSML_JSON, **({"lenient": True} if lenient else {})}
    _check_schema(schema, where, options)
    if not thinking:
        return llguidance.LLMatcher.grammar_from_json_schema(_with(schema, options))
    return llguidance.LLMatcher.grammar_from_lark(
        f"start: REASONING </think> reply\nreply: {_json(schema, options)}\n{_TERMINALS}"
    )


def _tool_functions(tools: Sequence[dict] | None) -> list[tuple[int, dict]]:
    out, names = [], set()
    for i, t in enumerate(tools or ()):
        f = t.get("function") if isinstance(t, dict) else None
        name = f.get("name") if isinstance(f, dict) else None
        if not isinstance(name, str) or not name or any(c in name for c in '"<>\n' + DSML[0]):
            raise GrammarError(f"tools[{i}].function.name: a function needs a plain name")
        if name in names:
            raise GrammarError(f"tools[{i}].function.name: {name!r} is defined twice")
        names.add(name)
        out.append((i, f))
    return out


class _Builder:
    def __init__(self):
        self.rules: list[str] = []

    def rule(self, name: str, body: str) -> str:
        self.rules.append(f"{name}: {body}")
        return name

    def invoke(self, i: int, f: dict, strict: bool) -> str:
        """Rule for one function's invoke, its parameters following its schema."""
        where = f"tools[{i}].function.parameters"
        params = f.get("parameters")
        params = {"type": "object"} if params is None else params
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise GrammarError(f"{where}: the parameters must be an object schema")
        head = _lit(f'\n<{DSML}invoke name="{f["name"]}">')
        props = params.get("properties") or {}
        if not isinstance(props, dict):
            raise GrammarError(f"{where}.properties: must be an object")
        required = params.get("required") or []
        missing = [k for k in required if k not in props]
        if missing and ("properties" in params or params.get("additionalProperties") is False):
            raise GrammarError(f"{where}.required: {missing[0]!r} is not in properties")
        if "properties" not in params and params.get("additionalProperties") is not False:
            return self.generic_invoke(f"f{i}", [f["name"]])
        defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
        options = _DSML_JSON if strict else {**_DSML_JSON, "lenient": True}
        items = []
        for j, (key, sub) in enumerate(props.items()):
            if any(c in key for c in '"<\n'):
                raise GrammarError(f"{where}.properties: {key!r} cannot be a DSML parameter name")
            p = self.param(f"f{i}p{j}", key, sub, defs, params, options, f"{where}.properties.{key}")
            items.append(p if key in required else f"{p}?")
        body = " ".join(items) + f' "\\n</{DSML}invoke>"'
        if not any(k in required for k in props):  # no parameter: the encoder's blank line
            body = f'({body} | "\\n\\n</{DSML}invoke>")'
        return self.rule(f"f{i}", f"{head} {body}")

    def param(self, name, key, sub, defs, root, options, where) -> str:
        tag = f'\n<{DSML}parameter name="{key}" string='
        close = _lit(f"</{DSML}parameter>")
        kind = value_kind(sub, root)
        alts = []
        if kind != "json":
            res = resolve_ref(sub, root)
            values = None
            if isinstance(res, dict) and "const" in res:
                values = [res["const"]]
            elif isinstance(res, dict) and isinstance(res.get("enum"), list):
                values = res["enum"]
            if values is None:
                alts.append(_lit(tag + '"true">') + " RAW")
            else:  # each literal with its closing tag: "a" and "ab" must not share a lexeme
                strs = [v for v in values if isinstance(v, str) and DSML not in v]
                alts += [_lit(f'{tag}"true">{v}</{DSML}parameter>') for v in strs]
        if kind != "string":
            schema = {**defs, **sub} if isinstance(sub, dict) else sub
            _check_schema(schema, where, options)
            schema = _no_markup(schema)
            alts.append(" ".join([_lit(tag + '"false">'), _json(schema, options), close]))
        if not alts:
            raise GrammarError(f"{where}: no value can be written for this schema")
        return self.rule(name, " | ".join(alts))

    def generic_invoke(self, name: str, fnames: Sequence[str]) -> str:
        """Any well-formed invoke of one of ``fnames``: parameters free, JSON checked."""
        if "gparam" not in {r.split(":")[0] for r in self.rules}:
            t = f'"\\n<{DSML}parameter name=\\"" KEY'
            self.rule(
                "gparam",
                f'{t} "\\" string=\\"true\\">" RAW | {t} "\\" string=\\"false\\">" '
                f'{_json(_ANY_JSON, _DSML_JSON)} "</{DSML}parameter>"',
            )
        heads = " | ".join(_lit(f'\n<{DSML}invoke name="{n}">') for n in fnames)
        return self.rule(name, f'({heads}) (gparam* "\\n</{DSML}invoke>" | "\\n\\n</{DSML}invoke>")')


def tool_call_grammar(
    tools: Sequence[dict] | None,
    choice: str,
    thinking: bool,
    *,
    parallel: bool = True,
) -> str | None:
    """Grammar for ``tool_choice`` (module docstring): ``"required"``, a function name, or
    ``"auto"``; ``parallel=False`` allows one invoke. None when nothing is constrained
    (``"none"``, or ``"auto"`` without strict functions)."""
    funcs = _tool_functions(tools)
    if choice == "none":
        return None
    b = _Builder()
    if choice == "auto":
        strict = [(i, f) for i, f in funcs if f.get("strict") is True]
        if not strict:
            return None
        invokes = [b.invoke(i, f, True) for i, f in strict]
        free = [f["name"] for i, f in funcs if f.get("strict") is not True]
        if free:
            invokes.append(b.generic_invoke("free", free))
        opener = "HEAD"
    else:
        if not funcs:
            raise GrammarError("tools: tool_choice needs at least one tool")
        if choice != "required":
            funcs = [(i, f) for i, f in funcs if f["name"] == choice]
            if not funcs:
                raise GrammarError(f"tool_choice: no tool named {choice!r}")
        invokes = [b.invoke(i, f, f.get("strict") is True) for i, f in funcs]
        opener = _lit(f"\n\n<{DSML}tool_calls>")
    b.rule("invoke", " | ".join(invokes))
    block = f'{opener} invoke{"+" if parallel else ""} "\\n</{DSML}tool_calls>"'
    reply = f"(TEXT | {block})" if choice == "auto" else block
    start = f"REASONING </think> {reply}" if thinking else reply
    lark = "\n".join([f"start: {start}", *b.rules, _TERMINALS])
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    _check(grammar, "tools")
    return grammar


# ---- matchers -----------------------------------------------------------------------

_TOKENIZERS: dict[tuple[int, int | None, int | None], tuple[Any, llguidance.LLTokenizer]] = {}
_LOCK = threading.Lock()


def llg_tokenizer(
    tokenizer, n_vocab: int | None = None, eos_token: int | None = None
) -> llguidance.LLTokenizer:
    """An ``llguidance.LLTokenizer`` for a ``tokenizers.Tokenizer``, cached per tokenizer.
    ``n_vocab``: the model's vocabulary (masks are that wide; default the tokenizer's);
    ``eos_token``: default the id of DeepSeek's EOS."""
    key = (id(tokenizer), n_vocab, eos_token)
    with _LOCK:
        hit = _TOKENIZERS.get(key)
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        eos = tokenizer.token_to_id(EOS) if eos_token is None else eos_token
        llt = llguidance.LLTokenizer(
            tokenizer.to_str(), n_vocab=n_vocab or tokenizer.get_vocab_size(), eos_token=eos
        )
        _TOKENIZERS[key] = (tokenizer, llt)  # holds the tokenizer: its id stays its own
        return llt


def compile_matcher(
    grammar: str, tokenizer, *, n_vocab: int | None = None, eos_token: int | None = None
) -> llguidance.LLMatcher:
    """A fresh matcher for ``grammar``; ``GrammarError`` when it does not compile."""
    llt = llg_tokenizer(tokenizer, n_vocab, eos_token)
    is_error, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, llt)
    if is_error:
        raise GrammarError(msgs[0] if msgs else "the grammar does not compile")
    m = llguidance.LLMatcher(llt, grammar, log_level=0)
    if m.is_error():
        raise GrammarError(m.get_error())
    return m
