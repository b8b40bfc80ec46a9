# -*- test-case-name: tests.test_conformance -*-
"""
The MCP conformance suite's fixture server, as an L{MCPApp}: the tools,
resources and prompts that the suite's C{server} scenarios call by name
(C{test_simple_text}, C{test://static-text}, C{test_simple_prompt}, ...),
with the contents its checks expect.

It is test-only: C{tests/test_conformance.py} serves it with
C{twist smeldr-oauth --app tests.conformance_app:app} (the checkout on
C{PYTHONPATH}); no default install serves it.

The names and contents follow the suite's own scenario descriptions in
C{@modelcontextprotocol/conformance} 0.1.16 (C{conformance list --server},
each scenario's "Server Implementation Requirements") and its reference
"everything server". Two things that server has are left out on purpose:

  - C{test_reconnection} (scenario C{server-sse-polling}, pending in 0.1.16,
    so not run): it closes the SSE stream of its own call mid-flight, which
    the L{MCPApp} API has no way to ask for;
  - the timers that add a dynamic tool and update C{test://watched-resource}
    every few seconds: no 0.1.16 scenario looks at them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from smeldr_oauth.mcp import (
    AudioContent,
    Context,
    EmbeddedResource,
    ImageContent,
    MCPApp,
    TextContent,
    ToolError,
)

#: A 1x1 red PNG, base64, as the suite's reference server sends it.
PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)

#: A minimal WAV file, base64.
WAV_BASE64 = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="

#: The tool whose input schema must come back untouched (SEP-1613).
JSON_SCHEMA_2020_12_INPUT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
    "additionalProperties": False,
}

#: The form the C{test_elicitation} tool asks the user to fill in.
ELICITATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "username": {"type": "string", "description": "User's response"},
        "email": {"type": "string", "description": "User's email address"},
    },
    "required": ["username", "email"],
}

#: SEP-1034: a default for every primitive type.
DEFAULTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "User name", "default": "John Doe"},
        "age": {"type": "integer", "description": "User age", "default": 30},
        "score": {"type": "number", "description": "User score", "default": 95.5},
        "status": {
            "type": "string",
            "description": "User status",
            "enum": ["active", "inactive", "pending"],
            "default": "active",
        },
        "verified": {"type": "boolean", "description": "Verification status", "default": True},
    },
    "required": [],
}

#: SEP-1330: the five enum shapes.
ENUMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "untitledSingle": {
            "type": "string",
            "description": "Select one option",
            "enum": ["option1", "option2", "option3"],
        },
        "titledSingle": {
            "type": "string",
            "description": "Select one option with titles",
            "oneOf": [
                {"const": "value1", "title": "First Option"},
                {"const": "value2", "title": "Second Option"},
                {"const": "value3", "title": "Third Option"},
            ],
        },
        "legacyEnum": {
            "type": "string",
            "description": "Select one option (legacy)",
            "enum": ["opt1", "opt2", "opt3"],
            "enumNames": ["Option One", "Option Two", "Option Three"],
        },
        "untitledMulti": {
            "type": "array",
            "description": "Select multiple options",
            "minItems": 1,
            "maxItems": 3,
            "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
        },
        "titledMulti": {
            "type": "array",
            "description": "Select multiple options with titles",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "anyOf": [
                    {"const": "value1", "title": "First Choice"},
                    {"const": "value2", "title": "Second Choice"},
                    {"const": "value3", "title": "Third Choice"},
                ]
            },
        },
    },
    "required": [],
}

#: What C{completion/complete} offers for C{test_prompt_with_arguments}.
COMPLETIONS = ("paris", "park", "party", "test", "testing")

#: The pause between the notifications of the logging and progress tools:
#: the suite checks that several notifications reach it while a call runs.
STEP = 0.05


def _elicited(result: Any) -> str:
    result = result if isinstance(result, dict) else {}
    return (
        f"Elicitation completed: action={result.get('action')}, "
        f"content={json.dumps(result.get('content') or {})}"
    )


def build_app(clock: IReactorTime) -> MCPApp:
    """
    The fixture app.

    @param clock: Paces the tools that notify while they run.
    """
    app = MCPApp(
        name="smeldr-conformance-fixture",
        version="1.0.0",
        instructions="Fixture server for the MCP conformance suite.",
    )

    def pause() -> Any:
        return deferLater(clock, STEP, lambda: None)

    # -- tools --------------------------------------------------------------

    @app.tool()
    def test_simple_text() -> str:
        """Tests simple text content response."""
        return "This is a simple text response for testing."

    @app.tool()
    def test_image_content() -> ImageContent:
        """Tests image content response."""
        return ImageContent(data=PNG_BASE64, mime_type="image/png")

    @app.tool()
    def test_audio_content() -> AudioContent:
        """Tests audio content response."""
        return AudioContent(data=WAV_BASE64, mime_type="audio/wav")

    @app.tool()
    def test_embedded_resource() -> EmbeddedResource:
        """Tests embedded resource content response."""
        return EmbeddedResource(
            uri="test://embedded-resource",
            mime_type="text/plain",
            text="This is an embedded resource content.",
        )

    @app.tool()
    def test_multiple_content_types() -> list[Any]:
        """Tests response with multiple content types (text, image, resource)."""
        return [
            TextContent("Multiple content types test:"),
            ImageContent(data=PNG_BASE64, mime_type="image/png"),
            EmbeddedResource(
                uri="test://mixed-content-resource",
                mime_type="application/json",
                text=json.dumps({"test": "data", "value": 123}),
            ),
        ]

    @app.tool()
    async def test_tool_with_logging(ctx: Context) -> str:
        """Tests tool that emits log messages during execution."""
        await ctx.log("info", "Tool execution started")
        await pause()
        await ctx.log("info", "Tool processing data")
        await pause()
        await ctx.log("info", "Tool execution completed")
        return "Tool with logging executed successfully"

    @app.tool()
    async def test_tool_with_progress(ctx: Context) -> str:
        """Tests tool that reports progress notifications."""
        for step in (0, 50, 100):
            if step:
                await pause()
            await ctx.report_progress(step, 100, f"Completed step {step} of 100")
        return "Tool with progress executed successfully"

    @app.tool()
    def test_error_handling() -> str:
        """Tests error response handling."""
        raise ToolError("This tool intentionally returns an error for testing")

    @app.tool()
    async def test_sampling(ctx: Context, prompt: Annotated[str, "The prompt to send to the LLM"]) -> str:
        """Tests server-initiated sampling (LLM completion request)."""
        result = await ctx.sample([{"role": "user", "content": {"type": "text", "text": prompt}}], 100)
        content = (result or {}).get("content") or {}
        return f"LLM response: {content.get('text', 'No response')}"

    @app.tool()
    async def test_elicitation(ctx: Context, message: Annotated[str, "The message to show the user"]) -> str:
        """Tests server-initiated elicitation (user input request)."""
        result = await ctx.elicit(message, ELICITATION_SCHEMA)
        result = result if isinstance(result, dict) else {}
        return (
            f"User response: action={result.get('action')}, content={json.dumps(result.get('content') or {})}"
        )

    @app.tool()
    async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
        """Tests elicitation with default values per SEP-1034."""
        return _elicited(
            await ctx.elicit("Please review and update the form fields with defaults", DEFAULTS_SCHEMA)
        )

    @app.tool()
    async def test_elicitation_sep1330_enums(ctx: Context) -> str:
        """Tests elicitation with enum schema improvements per SEP-1330."""
        return _elicited(await ctx.elicit("Please select options from the enum fields", ENUMS_SCHEMA))

    @app.tool(input_schema=JSON_SCHEMA_2020_12_INPUT_SCHEMA)
    def json_schema_2020_12_tool(**arguments: Any) -> str:
        """Tool with JSON Schema 2020-12 features for conformance testing (SEP-1613)."""
        return f"JSON Schema 2020-12 tool called with: {json.dumps(arguments)}"

    # -- resources ----------------------------------------------------------

    @app.resource(
        "test://static-text",
        name="static-text",
        title="Static Text Resource",
        mime_type="text/plain",
    )
    def static_text() -> str:
        """A static text resource for testing."""
        return "This is the content of the static text resource."

    @app.resource(
        "test://static-binary",
        name="static-binary",
        title="Static Binary Resource",
        mime_type="image/png",
    )
    def static_binary() -> bytes:
        """A static binary resource (image) for testing."""
        import base64

        return base64.b64decode(PNG_BASE64)

    @app.resource(
        "test://template/{id}/data",
        name="template",
        title="Resource Template",
        mime_type="application/json",
    )
    def template(id: str) -> str:
        """A resource template with parameter substitution."""
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    @app.resource(
        "test://watched-resource",
        name="watched-resource",
        title="Watched Resource",
        mime_type="text/plain",
    )
    def watched_resource() -> str:
        """A resource clients may subscribe to."""
        return "Watched resource content"

    # -- prompts ------------------------------------------------------------

    @app.prompt(title="Simple Test Prompt")
    def test_simple_prompt() -> str:
        """A simple prompt without arguments."""
        return "This is a simple prompt for testing."

    @app.prompt(title="Prompt With Arguments")
    def test_prompt_with_arguments(
        arg1: Annotated[str, "First test argument"],
        arg2: Annotated[str, "Second test argument"],
    ) -> str:
        """A prompt with required arguments."""
        return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"

    @app.prompt(title="Prompt With Embedded Resource")
    def test_prompt_with_embedded_resource(
        resourceUri: Annotated[str, "URI of the resource to embed"],
    ) -> list[dict[str, Any]]:
        """A prompt that includes an embedded resource."""
        return [
            {
                "role": "user",
                "content": EmbeddedResource(
                    uri=resourceUri,
                    mime_type="text/plain",
                    text="Embedded resource content for testing.",
                ),
            },
            {"role": "user", "content": "Please process the embedded resource above."},
        ]

    @app.prompt(title="Prompt With Image")
    def test_prompt_with_image() -> list[dict[str, Any]]:
        """A prompt that includes image content."""
        return [
            {"role": "user", "content": ImageContent(data=PNG_BASE64, mime_type="image/png")},
            {"role": "user", "content": "Please analyze the image above."},
        ]

    # -- completion ---------------------------------------------------------

    @app.completion("test_prompt_with_arguments", "arg1")
    def complete_arg1(value: str) -> list[str]:
        return [c for c in COMPLETIONS if c.startswith(value)]

    return app


def app() -> MCPApp:
    """
    What C{--app tests.conformance_app:app} loads: the fixture app paced by
    the running reactor (this is called by C{twist}'s service wiring, the
    layer that owns the reactor).
    """
    from twisted.internet import reactor

    return build_app(reactor)  # type: ignore[arg-type]
