"""Roles of the customer-support pipeline (in the manner of tau2-bench) over the store domain.

Each task is one customer with a goal. Its program (a state machine, see ``examples/customer_support``)::

    setup → user ⇄ assistant ⇄ tools … user → reward → sink

* :class:`StoreSetup` acquires the task's sandbox, copies the tool script into it and creates the
  store's SQLite database there (the seed). Everything the assistant does to the store happens
  in that sandbox, and only there.
* :class:`Customer` is the user simulator (an LLM playing the customer, with the task's
  instructions). Its first message is the task's ``first_message``; it ends the conversation by
  writing ``###STOP###``, or when ``max_user_turns`` is reached.
* :class:`Assistant` is the agent under test (an LLM with the tools' descriptions and the store's
  policy). A line ``CALL tool {json args}`` in its reply is a tool call; anything else is a
  message to the customer. With ``oracle: true`` it performs the task's expected actions instead
  of asking its LLM: a check of the whole path (sandbox, tools, reward) that must score 1.0.
* :class:`StoreTools` runs the call in the task's sandbox (``python3 -I /work/tools.py TOOL ARGS``).
* :class:`Reward` dumps the database in the sandbox and compares it with the expected final
  state: 1.0 if they are equal, else 0.0 with a diff.

Results written: ``next`` (routing), ``tool_call``/``tool_result`` (between assistant and tools),
``tool_calls`` (count), ``user_turns``, ``stop_reason``, ``reward``, ``db_match``, ``info_match``
(read-only tasks: every fact the customer asked for appears in what the agent said), ``db_diff``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agentmesh.agent.role import Role
from agentmesh.container.client import ContainerGone
from agentmesh.container.roles import Command, ToolExecutor
from agentmesh.container.sandbox import ExecResult
from agentmesh.errors import ConfigError, TaskFailed
from agentmesh.pipelines.customer_support import domain

if TYPE_CHECKING:
    from agentmesh.agent.role import Task

__all__ = ["Assistant", "Customer", "Reward", "StoreSetup", "StoreTools"]

TOOLS_PATH = "/work/tools.py"
STOP = "###STOP###"
# turn metadata: what a history entry is, for building each side's view of the conversation
KIND = "kind"


def _int(params: Mapping[str, Any], key: str, role: str, default: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"expected an integer >= 0, got {value!r}", key=f"roles.{role}.params.{key}")
    return value


def _count(task: Task, key: str) -> int:
    return int(task.results.get(key, "0") or 0)


def _chat(task: Task, system: str, *, me: str) -> list[dict[str, str]]:
    """The conversation as chat messages from ``me``'s side (``customer`` or ``assistant``): my turns
    are the chat's assistant turns, the other side's its user turns; tool results are shown to the
    agent only, as user turns."""
    messages = [{"role": "system", "content": system}]
    for kind, text in _conversation(task):
        if kind == me:
            messages.append({"role": "assistant", "content": text})
        elif kind in ("customer", "assistant"):
            messages.append({"role": "user", "content": text})
        elif me == "assistant":
            messages.append({"role": "user", "content": f"TOOL RESULT: {text}"})
    return messages


def _conversation(task: Task) -> list[tuple[str, str]]:
    """(kind, text) of the conversation so far: ``customer``, ``assistant``, ``tool``."""
    out = []
    for turn in task.orchestrator.history:
        kind = turn.metadata.get(KIND, "")
        if kind in ("customer", "assistant", "tool"):
            out.append((kind, turn.content))
    return out


async def _run_tool_script(role: Role, task: Task, argv: list[str], stdin: bytes = b"") -> ExecResult:
    ref = await role.sandbox(task)
    try:
        return await role.containers.exec(ref, argv, stdin=stdin)
    except ContainerGone as exc:
        raise TaskFailed("sandbox_lost", f"the task's sandbox is gone: {exc}") from None


class StoreSetup(Role):
    """Puts the tool script and a freshly seeded database in the task's sandbox."""

    async def step(self, task: Task) -> None:
        script = domain.sandbox_tools_source().encode()
        r = await _run_tool_script(
            self,
            task,
            ["sh", "-c", f"cat > {TOOLS_PATH} && python3 -I {TOOLS_PATH} init"],
            stdin=script,
        )
        if not r.ok:
            raise RuntimeError(
                f"store setup failed (exit {r.exit_code}): {r.stderr.decode(errors='replace')[:300]}"
            )
        task.results["next"] = "user"


class Customer(Role):
    """The user simulator. Params: ``max_user_turns`` (default 4), ``max_tokens``, ``temperature``."""

    async def step(self, task: Task) -> None:
        p = self.ctx.params
        turns = _count(task, "user_turns")
        row = task.input
        usage = (0, 0)
        if turns == 0:
            text = str(row.get("first_message") or "Hello, I need help with an order.")
        elif turns >= _int(p, "max_user_turns", self.ctx.name, 4):
            task.results["stop_reason"] = "max_user_turns"
            task.results["next"] = "reward"
            return
        else:
            text, usage = await self._reply(task)
        task.results["user_turns"] = str(turns + 1)
        done = STOP in text
        task.add_turn(
            text.replace(STOP, "").strip() or "(ends the conversation)",
            prompt_tokens=usage[0],
            completion_tokens=usage[1],
            metadata={KIND: "customer"},
        )
        if done:
            task.results["stop_reason"] = "customer_done"
            task.results["next"] = "reward"
        else:
            task.results["next"] = "assistant"

    async def _reply(self, task: Task) -> tuple[str, tuple[int, int]]:
        row = task.input
        user = row.get("user") or {}
        system = (
            "You are a customer talking to an online store's support agent. Stay in character; write "
            "only your next message, one or two sentences.\n"
            f"Who you are: {json.dumps(user)}\n"
            f"Your goal: {row.get('instructions', '')}\n"
            f"When your goal is met, or cannot be met, write {STOP} at the end of your message."
        )
        result = await self.llm.chat(
            _chat(task, system, me="customer"),
            max_tokens=int(self.ctx.params.get("max_tokens", 60)),
            temperature=float(self.ctx.params.get("temperature", 0.7)),
            seed=task.seed + _count(task, "user_turns"),  # a new draw each turn
        )
        return result.text.strip() or STOP, (result.prompt_tokens, result.completion_tokens)


class Assistant(Role):
    """The support agent. Params: ``max_tool_calls`` (default 6), ``max_tokens``, ``temperature``,
    ``oracle`` (perform the task's expected actions instead of asking the LLM)."""

    async def step(self, task: Task) -> None:
        p = self.ctx.params
        calls = _count(task, "tool_calls")
        can_call = calls < _int(p, "max_tool_calls", self.ctx.name, 6)
        if p.get("oracle"):
            text = self._oracle(task, calls)
            usage: tuple[int, int] = (0, 0)
        else:
            result = await self.llm.chat(
                self._messages(task),
                max_tokens=int(p.get("max_tokens", 96)),
                temperature=float(p.get("temperature", 0.2)),
                seed=task.seed + calls + 1000 * _count(task, "user_turns"),
            )
            text, usage = result.text.strip(), (result.prompt_tokens, result.completion_tokens)
        call = domain.parse_tool_call(text) if can_call else None
        task.add_turn(
            text or "(no answer)",
            prompt_tokens=usage[0],
            completion_tokens=usage[1],
            metadata={KIND: "assistant", "tool": call.tool if call else ""},
        )
        if call is not None:
            task.results["tool_call"] = json.dumps({"tool": call.tool, "args": call.args})
            task.results["tool_calls"] = str(calls + 1)
            task.results["next"] = "tools"
        else:
            task.results["next"] = "user"

    def _oracle(self, task: Task, calls: int) -> str:
        actions = task.input.get("expected_actions") or []
        if calls < len(actions):
            a = actions[calls]
            return f"CALL {a['tool']} {json.dumps(a.get('args') or {})}"
        facts = task.input.get("expected_info") or []
        if facts:
            return "Here is what I found: " + "; ".join(str(f) for f in facts) + "."
        return "All done: is there anything else I can help with?"

    def _messages(self, task: Task) -> list[dict[str, str]]:
        system = (
            "You are the support agent of an online store. Help the customer using the tools; follow "
            "the store's policy.\n"
            f"Policy: {domain.POLICY}\n"
            "Tools (call one by writing a single line: CALL tool_name {json arguments}):\n"
            + domain.tools_prompt()
        )
        return _chat(task, system, me="assistant")


class StoreTools(ToolExecutor):
    """Runs the assistant's call against the store in the task's sandbox."""

    async def command(self, task: Task, call: Mapping[str, Any]) -> Command:
        tool, args = call.get("tool"), call.get("args") or {}
        if not isinstance(tool, str) or not isinstance(args, Mapping):
            raise TaskFailed("bad_tool_call", "tool_call: expected {'tool': str, 'args': object}")
        return Command(argv=["python3", "-I", TOOLS_PATH, tool, json.dumps(args)])

    async def record(self, task: Task, call: Mapping[str, Any], result: ExecResult) -> None:
        out = result.stdout.decode(errors="replace").strip()
        if not result.ok or not out:
            out = json.dumps(
                {
                    "ok": False,
                    "error": f"tool crashed (exit {result.exit_code}): "
                    + result.stderr.decode(errors="replace")[-300:],
                }
            )
        task.results["tool_result"] = out[:4000]
        task.add_turn(out[:4000], metadata={KIND: "tool", "tool": str(call.get("tool", ""))})
        task.results["next"] = "assistant"


class Reward(Role):
    """Compares the store's final state in the sandbox with the expected one (tau2's DB check)."""

    async def step(self, task: Task) -> None:
        r = await _run_tool_script(self, task, ["python3", "-I", TOOLS_PATH, "dump"])
        try:
            reply = json.loads(r.stdout)
            dump = reply["result"] if isinstance(reply, dict) and "result" in reply else reply
        except (ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(f"dump of the store failed (exit {r.exit_code}): {exc}") from None
        # what the agent told the customer counts too (tau2's "communicated info" check)
        said = "\n".join(text for kind, text in _conversation(task) if kind == "assistant")
        verdict = domain.reward(task.input, dump, assistant_text=said)
        task.results["reward"] = f"{float(verdict['reward']):.1f}"
        task.results["db_match"] = "true" if verdict["db_match"] else "false"
        info = verdict.get("info_match")
        task.results["info_match"] = "" if info is None else ("true" if info else "false")
        task.results["db_diff"] = str(verdict.get("diff", ""))[:2000]
        task.results.setdefault("stop_reason", "")
