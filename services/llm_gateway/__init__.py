"""agentmesh.llm_gateway"""
