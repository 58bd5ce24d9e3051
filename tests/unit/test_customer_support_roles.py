"""Each side's view of a customer-support conversation, as the LLM roles send it."""

from __future__ import annotations

from agentmesh.agent.role import Task
from agentmesh.pipelines.customer_support.roles import KIND, _chat
from agentmesh.v1 import orchestrator_pb2 as pb


def _task() -> Task:
    orch = pb.Orchestrator(task_id="t")
    for kind, text in [
        ("customer", "hi"),
        ("assistant", "CALL get_order {}"),
        ("tool", "{ok}"),
        ("assistant", "done"),
    ]:
        orch.history.add(content=text).metadata[KIND] = kind
    orch.history.add(content="not a turn of the conversation")
    return Task(orch, role="x", replica_id="r")


def test_customer_sees_the_agent_as_the_user_and_no_tool_results() -> None:
    assert _chat(_task(), "S", me="customer") == [
        {"role": "system", "content": "S"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "CALL get_order {}"},
        {"role": "user", "content": "done"},
    ]


def test_agent_sees_the_customer_as_the_user_and_tool_results() -> None:
    assert _chat(_task(), "S", me="assistant") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "CALL get_order {}"},
        {"role": "user", "content": "TOOL RESULT: {ok}"},
        {"role": "assistant", "content": "done"},
    ]
