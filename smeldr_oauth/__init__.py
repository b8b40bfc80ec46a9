"""smeldr-oauth: an OAuth 2.1 authorization server and MCP server on Twisted."""
