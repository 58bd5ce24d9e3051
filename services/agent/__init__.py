"""The agent runtime: roles, replicas, routing programs, forwarding between peers."""

from __future__ import annotations

from agentmesh.agent.role import Role, RoleContext, Task

__all__ = ["Role", "RoleContext", "Task"]
