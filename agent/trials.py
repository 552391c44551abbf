"""Trial runs in chat: "try it on 500 rows first", then "run the full job" with the same spec.

- :func:`trial_rows` reads the sample size of a trial request ("try it on 500 rows first", "先用500条试一下") for
  ``launch_finetune``'s ``sample_rows``.
- :func:`full_run_call` turns "run the full job" / "yes, full run" / "跑完整的" — or a bare "yes" right after the
  trial's end was announced — into a ``launch_finetune`` call with the trial's spec minus ``sample_rows`` (and
  minus the step cap the trial added), keeping only values that differ from the defaults so the preview reads like
  the user's own request. It goes through the usual confirmation: the preview shows the full run's preflight, and
  only a yes to it launches (DESIGN §3). The trial is the user's latest job whose spec has ``trial``, read through
  the agent's job service.

A bare "yes" (not "ok", which may only acknowledge) is taken as "run the full job" only when it cannot mean
anything else: nothing waits for a confirmation in the thread (the facade answers a pending one first), this thread
launched or last looked at the trial, the trial is the user's newest job and succeeded, its end was announced
(announcements go to the thread that launched the job, and nowhere else), the local brain routed no turn in the
thread since, that was at most ``YES_WINDOW_S`` ago, and no earlier "yes" took the offer up. Otherwise a bare "yes"
keeps its usual answer ("nothing is waiting for a confirmation") and the explicit phrase still works. Even then the
"yes" only opens the confirmation: the launch needs a second yes to the full run's preview.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from tools.finetune.spec import FinetuneSpec

YES_WINDOW_S = 24 * 3600
SCAN_JOBS = 50           # how far back "the latest trial" is looked for
FULL_RUN = {"full_run": True}     # marks the calls full_run_call plans
log = logging.getLogger(__name__)

# ---- "try it on 500 rows first": a row count said next to a trial word -------------------------------------

_ROWS_N = r"(\d{1,3}(?:,\d{3})+|\d{1,7})\s*(k|千|万)?"
_ROW_UNIT = r"\s*-?\s*(?:rows?|examples?|samples?|records?|lines?)\b"
_SAMPLE = [
    re.compile(r"\bsample[_ ]rows\s*(?:=|:|：|of|to)?\s*" + _ROWS_N, re.IGNORECASE),
    re.compile(r"\b(?:on|with|using|to|for)\s+(?:a\s+|just\s+|only\s+|the\s+first\s+|first\s+|"
               r"a\s+(?:random\s+|stratified\s+|small\s+)?(?:sample|subset)\s+of\s+)?" + _ROWS_N + _ROW_UNIT,
               re.IGNORECASE),
    re.compile(r"\b(?:sample|subsample|subset\s+of|first|only|just)\s+" + _ROWS_N + _ROW_UNIT, re.IGNORECASE),
    re.compile(r"(?<![\w.])" + _ROWS_N + r"[- ](?:row|example|sample|record)s?\s+(?:sample|subset|trial|test|"
               r"experiment|pilot|run|dry[- ]run)\b", re.IGNORECASE),
    re.compile(r"(?:用|拿|取|抽|抽样|采样|抽取|选|挑)\s*(?:前|其中|出)?\s*" + _ROWS_N + r"\s*(?:条|行|个样本|个例子)"),
    re.compile(r"(?<!第)" + _ROWS_N + r"\s*(?:条|行)(?:数据|样本)?\s*(?:先)?\s*(?:试|跑一下|跑跑|测试|做个?实验)"),
    re.compile(r"(?:试跑|试一下|试试|小规模)\D{0,6}?" + _ROWS_N + r"\s*(?:条|行)"),
]
_TRIAL_CUE = re.compile(r"\b(?:first|trial|try|trying|test|testing|quick|quickly|pilot|sample|sampled|subsample|"
                        r"subset|experiment|mve|only|just|dry[- ]run)\b|sample_rows|先|试|抽样|采样|抽取|抽|小规模|"
                        r"只用|只拿|只取|拿|取|用|选|挑", re.IGNORECASE)
_SCALE = {"k": 1000, "千": 1000, "万": 10000}


def trial_rows(text: str) -> int | None:
    """The sample size of a trial request, or None.

    Example:
        >>> trial_rows("fine-tune Qwen2.5-0.5B on data.jsonl, try it on 500 rows first"), trial_rows("先用1千条试一下")
        (500, 1000)
        >>> trial_rows("my data set has 3000 rows") is None
        True
    """
    if not _TRIAL_CUE.search(text):
        return None
    for rx in _SAMPLE:
        m = rx.search(text)
        if m:
            return int(m.group(1).replace(",", "")) * _SCALE.get((m.group(2) or "").lower(), 1)
    return None


# ---- "run the full job" ----------------------------------------------------------------------------------

_FULL_EN = re.compile(
    r"^(?:(?:yes|yeah|yep|ok(?:ay)?|sure|great|good|nice|cool|perfect|looks good|alright)\b[\s,.!]*)?"
    r"(?:(?:now|then|please|pls|and|so)\s+)*(?:(?:let'?s|go\s+ahead\s+and|ok)\s+)?"
    r"(?:(?:run|launch|start|do|kick\s+off|go\s+(?:for|with)|queue|train|fine-?tune)\s+)?"
    r"(?:(?:it|that|this)\s+)?(?:(?:the|a)\s+)?"
    r"(?:(?:full|whole|complete|real)(?:[- ]size[d]?)?\s+(?:job|run|training(?:\s+run)?|data\s?set|version|thing|one)"
    r"|on\s+(?:all|every|the\s+(?:full|whole|complete|entire))\s+(?:(?:the\s+)?\d[\d,]*\s+)?"
    r"(?:rows?|data(?:\s?set)?|examples?|samples?))"
    r"(?:\s+(?:now|please|pls|too|then|on\s+(?:all|every)\s+(?:the\s+)?(?:\d[\d,]*\s+)?"
    r"(?:rows?|data(?:\s?set)?|examples?)))*[\s.!]*$",
    re.IGNORECASE)
_ZH_LEAD = re.compile(r"^(?:(?:好的?|可以|行|嗯|是的?|ok|没问题)[，,。！!\s]*)?"
                      r"(?:那就|那|就|现在|再|接着|然后|直接|请|帮我|麻烦)*\s*", re.IGNORECASE)
_ZH_TAIL = re.compile(r"\s*(?:吧|了|啊|呗|哈)?[。！!\s]*$")
_ZH_FULL = re.compile(
    r"(?:跑|训练|运行|启动|开始|执行|来)?\s*(?:一下|一遍|一个|个)?\s*(?:完整|全量|正式)(?:的|版)?\s*"
    r"(?:任务|训练|版本|运行|那个|一版)?(?:\s*(?:跑|训练|运行|启动|开始)(?:一下|一遍|起来)?)?"
    r"|(?:用|在|拿|跑)\s*(?:全部|所有|全量|整个)的?\s*(?:数据集?|行|样本|\d[\d,]*\s*[条行])?\s*上?\s*"
    r"(?:跑|训练|微调|来)?(?:一下|一遍)?")


# The yes that takes up the offer: "ok" / "好的" after an announcement reads as an acknowledgement, so not those.
_TAKE_UP = re.compile(r"^(?:y|yes|yes please|yep|yeah|sure|go ahead|do it|run it|launch it|是|是的|确认|可以|行|"
                      r"开始吧?|跑吧)[.!。！\s]*$", re.IGNORECASE)


def wants_full_run(text: str) -> bool:
    """Whether ``text`` asks for the full run after a trial: "run the full job", "yes, full run", "跑完整的"."""
    t = text.strip()
    if not t or len(t) > 80:
        return False
    if _FULL_EN.match(t):
        return True
    core = _ZH_TAIL.sub("", _ZH_LEAD.sub("", t, count=1), count=1)
    return len(t) <= 24 and bool(core) and _ZH_FULL.fullmatch(core) is not None


def full_run_args(spec: dict[str, Any]) -> dict[str, Any]:
    """The full run's ``launch_finetune`` args from a trial job's spec: its fields without ``sample_rows`` and the
    trial's own step cap, only those that differ from the defaults."""
    trial = spec.get("trial") if isinstance(spec.get("trial"), dict) else {}
    args: dict[str, Any] = {}
    for name, field in FinetuneSpec.model_fields.items():
        if name == "sample_rows" or name not in spec:
            continue
        value = spec[name]
        if name == "max_steps" and trial.get("max_steps") is not None:
            continue                     # the cap the trial added, not the user's
        if name == "lora_alpha" and value == 2 * int(spec.get("lora_rank") or 16):
            continue                     # the default alpha (2 × rank)
        if not field.is_required() and value == field.default:
            continue
        args[name] = value
    return args


def latest_trial(jobs: Any, user_id: str) -> dict | None:
    """The user's newest trial job (``JobsService.show``'s dict), or None; ``full_runs`` lists the newer jobs that
    already run its spec on all rows."""
    newer = []
    for row in jobs.list(user_id, limit=SCAN_JOBS):
        job = jobs.show(row["id"], user_id)
        if isinstance((job.get("spec") or {}).get("trial"), dict):
            full = full_run_args(job["spec"])
            return job | {"full_runs": [j["id"] for j in newer if full_run_args(j.get("spec") or {}) == full]}
        newer.append(job)
    return None


def announced_trial(jobs: Any, user_id: str, memo: dict, routed_before: float | None,
                    now: float | None = None) -> dict | None:
    """The trial a bare "yes" answers (see the module docstring) as ``Job.to_dict``, or None. Once taken up, an
    offer is not taken up again by a later "yes" in the thread."""
    last = memo.get("last_job_id")
    if not last or memo.get("trial_offer_taken") == last:
        return None
    newest = jobs.list(user_id, limit=1)
    if not newest or newest[0]["id"] != last or newest[0]["status"] != "succeeded":
        return None
    job = jobs.store.get(last, owner=user_id)     # the record itself: announced_at to the sub-second
    if not isinstance((job.spec or {}).get("trial"), dict) or job.announced_at is None:
        return None
    if routed_before is not None and routed_before >= job.announced_at:
        return None                      # the thread has moved on since the announcement
    if (time.time() if now is None else now) - job.announced_at > YES_WINDOW_S:
        return None
    memo["trial_offer_taken"] = last
    return job.to_dict()


# ---- planning --------------------------------------------------------------------------------------------

def full_run_call(step: str, lang: str, memo: dict, user_id: str | None, routed_before: float | None,
                  jobs: Any) -> dict | None:
    """The planned call for a step that asks for a trial's full run (``followup``: the line above its confirmation
    question), a call that answers in words (``reply``: no trial, no job store), or None when the step is about
    something else. ``jobs``: () -> the agent's ``JobsService``."""
    from agent.jobs import JobsError

    explicit = wants_full_run(step)
    if not explicit and not _TAKE_UP.match(step.strip()):
        return None
    job = None
    try:
        if jobs is not None and user_id:
            job = latest_trial(jobs(), user_id) if explicit else announced_trial(jobs(), user_id, memo, routed_before)
    except JobsError as exc:
        if not explicit:
            log.warning("could not look for a trial job to answer a bare yes: %s", exc.message)
            return None
        return reply_call(step, store_error_text(exc.message, lang), "the job store is unavailable") | FULL_RUN
    if job is None:
        return reply_call(step, no_trial_text(lang), "a full run follows a trial job; there is none") | FULL_RUN \
            if explicit else None
    return {"step": step, "tool": "launch_finetune", "args": full_run_args(job["spec"]), "score": 1.0,
            "status": "planned", "record": None, "followup": lead_text(job, lang),
            "why": f"the full run of trial {job['id']}: its spec without sample_rows"} | FULL_RUN


def reply_call(step: str, text: str, why: str) -> dict:
    """A step answered in words, with no tool to run."""
    return {"step": step, "tool": None, "args": {}, "score": 1.0, "status": "chat", "record": None, "why": why,
            "reply": text}


def settle(plan: list[dict], notice: str | None, lang: str, nothing_pending: str) -> str | None:
    """What the steps of one message say about each other (``plan`` changed in place); returns the turn's notice.

    A trial step that amends a launch of the same message replaces it ("…, and also try it on 500 rows"); a full
    run asked for in the message that launches its trial waits for the trial; a full run's lead line becomes the
    notice (in place of "nothing is waiting for a confirmation", which a bare "yes" brought)."""
    for call in list(plan):
        at = next(i for i, c in enumerate(plan) if c is call)
        earlier = [c for c in plan[:at] if c.get("tool") == "launch_finetune"]
        if call.get("amends") and earlier:
            plan.remove(earlier[-1])
        elif call.get("full_run") and any("sample_rows" in (c.get("args") or {}) for c in earlier):
            call.update(reply_call(call["step"], after_trial_text(lang), "the trial runs first"), followup=None)
    leads = [c["followup"] for c in plan if c.get("followup")]
    if not leads:
        return notice
    kept = notice if notice and notice != nothing_pending else None
    return "\n".join(x for x in (kept, leads[0]) if x)


# ---- texts -----------------------------------------------------------------------------------------------

def lead_text(job: dict, lang: str) -> str:
    """The line above the full run's confirmation question."""
    trial = job["spec"]["trial"]
    rows, of, status, runs = trial.get("rows"), trial.get("of"), job.get("status"), job.get("full_runs") or []
    if lang == "zh":
        text = f"完整任务：用试跑 {job['id']} 的配置（去掉抽样）在全部 {of:,} 行上训练（试跑用了 {rows:,} 行）。"
        text += f"注意：试跑 {job['id']} 还没有成功完成（{status}）。" if status != "succeeded" else ""
        return text + (f"注意：{'、'.join(runs)} 已经用这个配置在全部数据上训练过或正在训练。" if runs else "")
    text = f"The full run: trial {job['id']}'s spec without the sample, on all {of:,} rows (the trial used {rows:,})."
    text += f" Note: trial {job['id']} has not succeeded ({status})." if status != "succeeded" else ""
    return text + (f" Note: {', '.join(runs)} already ran or runs this spec on all rows." if runs else "")


def no_trial_text(lang: str) -> str:
    if lang == "zh":
        return ("你还没有试跑任务，所以没有可以扩展成完整任务的配置。先试跑一次，例如："
                "“用 LoRA 在 data.jsonl 上微调 Qwen2.5-0.5B，先用500条试一下”；结束后说“跑完整的”。")
    return ("You have no trial job yet, so there is no spec to scale up to the full data set. Start one with, "
            "e.g., \"fine-tune Qwen2.5-0.5B on data.jsonl, try it on 500 rows first\"; when it ends, say "
            "\"run the full job\".")


def store_error_text(message: str, lang: str) -> str:
    if lang == "zh":
        return f"现在读不到你的任务记录，找不到试跑任务：{message}"
    return f"I can't read your jobs right now, so I can't find the trial to scale up: {message}"


def after_trial_text(lang: str) -> str:
    """A full run asked for in the same message that launches the trial."""
    if lang == "zh":
        return "完整任务要等试跑结束：试跑完成时我会告诉你，然后说“跑完整的”即可。"
    return "The full run comes after the trial: I'll tell you when the trial ends; then say \"run the full job\"."
