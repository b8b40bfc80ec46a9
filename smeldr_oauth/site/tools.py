# -*- test-case-name: tests.test_site_tools -*-
"""
The MCP face of the default site: tools to list, read, search, write,
publish and delete posts; published posts as resources
C{smeldr://posts/{slug}}; prompts to draft and summarise.

Reading needs the C{read} scope, changing anything C{write}: the consent page
shows the words of L{site_scopes}, so what a user approves is exactly what
the tools check.

The handlers only translate: arguments to L{PostStore} calls, L{Post}s to
JSON (L{smeldr_oauth.site.post_json}), the store's typed errors to
L{ToolError}s (which the model sees and can correct), and changes to
resource notifications.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Callable, Literal

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from smeldr_oauth.mcp import Context, MCPApp, ToolError
from smeldr_oauth.mcp.jsonrpc import invalid_params
from smeldr_oauth.site.post_json import (
    DELETED_SCHEMA,
    LIST_SCHEMA,
    POST_SCHEMA,
    POST_URI,
    SEARCH_SCHEMA,
    WRITTEN_SCHEMA,
    excerpt,
    hit_json,
    post_json,
    post_summary,
    post_uri,
    written_json,
)
from smeldr_oauth.site.posts import MAX_LIMIT, PUBLISHED, Post, PostNotFound, PostStore, SiteError
from smeldr_oauth.site.stores import SiteStores, open_site

#: The hints of every tool that only reads (MCP tool annotations).
READ_ONLY = {"readOnlyHint": True, "idempotentHint": True, "openWorldHint": False}


def writes(*, destructive: bool, idempotent: bool, open_world: bool) -> dict[str, bool]:
    """The hints of a tool that changes posts."""
    return {
        "readOnlyHint": False,
        "destructiveHint": destructive,
        "idempotentHint": idempotent,
        "openWorldHint": open_world,
    }


#: How many published posts C{resources/list} shows (newest first).
RESOURCE_LIST_LIMIT = 200


def site_scopes() -> dict[str, str]:
    """
    The scopes the site's tools use, each with the words the consent page
    shows for it.
    """
    return {
        "read": "Read your site's posts",
        "write": "Create, edit, publish and delete your site's posts",
    }


INSTRUCTIONS = """\
This server manages the posts of a website. Posts are markdown with a title,
tags and a status: drafts are private, published posts are public and are
also readable as resources smeldr://posts/<slug>. Use search_posts or
list_posts to find posts, get_post to read one in full. New posts start as
drafts: create_post, then publish_post when the user agrees.\
"""


def _as_tool_error(failure: Failure) -> None:
    """
    The store's typed errors become tool errors: their messages are written
    for the caller and name the bad argument, so the model can fix its call.
    """
    failure.trap(SiteError)
    raise ToolError(str(failure.value))


def _whole(value: float | None) -> int | None:
    # JSON has one number type: accept 10.0 where an integer is meant.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value  # type: ignore[return-value]


# Argument types: the annotations carry the descriptions the schema shows.

Slug = Annotated[
    str, "The post's slug, e.g. 'my-first-post' (see list_posts or search_posts)."
]
Status = Literal["draft", "published"]
StatusFilter = Annotated[Status | None, "Only posts in this status; omit for all."]
Tags = Annotated[
    list[str] | None,
    "Tags: lowercase letters, digits and hyphens, at most 20 (e.g. ['python', 'how-to']).",
]


def build_app(
    site: str | os.PathLike[str] | SiteStores | PostStore, reactor: Any = None
) -> MCPApp:
    """
    The site's L{MCPApp}.

    @param site: the site database's path (opened here, with C{reactor}),
        or already open L{SiteStores}, or just a L{PostStore}.
    @param reactor: for the database pool when C{site} is a path.
    """
    if isinstance(site, PostStore):
        posts = site
    elif isinstance(site, SiteStores):
        posts = site.posts
    else:
        posts = open_site(site, reactor).posts

    app = MCPApp(name="smeldr-site", version="0.1.0", instructions=INSTRUCTIONS)

    def changed(before: Post | None, after: Post | None) -> None:
        """
        Tell subscribers what a change did to the published posts: each
        published URI it touched was updated, and since the resource list
        shows titles and excerpts, the list changed too.
        """
        uris = {
            post_uri(p.slug)
            for p in (before, after)
            if p is not None and p.status == PUBLISHED
        }
        for uri in sorted(uris):
            app.notify_resource_updated(uri)
        if uris:
            app.notify_list_changed("resources")

    async def rewrite(ctx: Context, slug: str, change: Callable[[], Deferred]) -> dict[str, Any]:
        """Change an existing post, tell subscribers, answer what was written."""
        try:
            before = await posts.get(slug)
            after = await change()
        except SiteError as e:
            raise ToolError(str(e))
        changed(before, after)
        return written_json(after, ctx)

    # -- read ------------------------------------------------------------------

    @app.tool(
        title="List posts",
        description=(
            "List the site's posts, newest first, without their bodies (each has an excerpt). "
            "Filter by status or tag. Results come in pages: when next_cursor is not null, "
            "call again with cursor=next_cursor for more."
        ),
        scopes=("read",),
        output_schema=LIST_SCHEMA,
        annotations=READ_ONLY,
    )
    def list_posts(
        ctx: Context,
        status: StatusFilter = None,
        tag: Annotated[str | None, "Only posts with this tag."] = None,
        limit: Annotated[int, f"Posts per page, 1 to {MAX_LIMIT}."] = 20,
        cursor: Annotated[str | None, "next_cursor from the previous page."] = None,
    ) -> Deferred:
        d = posts.list(status=status, tag=tag, limit=_whole(limit), cursor=cursor)
        d.addCallback(
            lambda page: {
                "posts": [post_summary(p) for p in page.posts],
                "next_cursor": page.next_cursor,
            }
        )
        return d.addErrback(_as_tool_error)

    @app.tool(
        title="Get a post",
        description="Read one post in full (markdown body, tags, status, dates) by its slug.",
        scopes=("read",),
        output_schema=POST_SCHEMA,
        annotations=READ_ONLY,
    )
    def get_post(ctx: Context, slug: Slug) -> Deferred:
        return posts.get(slug).addCallback(post_json).addErrback(_as_tool_error)

    @app.tool(
        title="Search posts",
        description=(
            "Full-text search over titles, bodies and tags, best matches first. Every word must "
            "match (stemmed: 'running' finds 'run'); end a word with * to match a prefix. "
            "Quotes and operators are ignored. Returns summaries with a snippet around the match."
        ),
        scopes=("read",),
        output_schema=SEARCH_SCHEMA,
        annotations=READ_ONLY,
    )
    def search_posts(
        ctx: Context,
        query: Annotated[str, "Words to look for, e.g. 'twisted deferred'."],
        status: StatusFilter = None,
        limit: Annotated[int, f"At most this many results, 1 to {MAX_LIMIT}."] = 10,
    ) -> Deferred:
        d = posts.search(query, status=status, limit=_whole(limit))
        d.addCallback(lambda hits: {"results": [hit_json(h) for h in hits]})
        return d.addErrback(_as_tool_error)

    # -- write -----------------------------------------------------------------

    @app.tool(
        title="Create a post",
        description=(
            "Create a post. It starts as a draft (private) unless status is 'published'; "
            "prefer drafts and publish_post once the user has approved. The slug (the post's "
            "address) is made from the title unless given."
        ),
        scopes=("write",),
        output_schema=WRITTEN_SCHEMA,
        annotations=writes(destructive=False, idempotent=False, open_world=False),
    )
    def create_post(
        ctx: Context,
        title: Annotated[str, "The title, one line, at most 200 characters."],
        body: Annotated[str, "The content, in markdown."] = "",
        tags: Tags = None,
        slug: Annotated[
            str | None,
            "The address: lowercase letters, digits and hyphens. Made from the title if omitted.",
        ] = None,
        status: Annotated[Status, "'draft' (default) or 'published'."] = "draft",
    ) -> Deferred:
        d = posts.create(title, body=body, slug=slug, tags=tags or [], status=status)

        def done(post: Post) -> dict[str, Any]:
            changed(None, post)
            return written_json(post, ctx)

        return d.addCallbacks(done, _as_tool_error)

    @app.tool(
        title="Update a post",
        description=(
            "Change a post's title, body, tags, slug or status. Only the fields given change; "
            "tags, when given, replace the old ones. Setting status to 'draft' unpublishes it."
        ),
        scopes=("write",),
        output_schema=WRITTEN_SCHEMA,
        annotations=writes(destructive=True, idempotent=True, open_world=False),
    )
    async def update_post(
        ctx: Context,
        slug: Slug,
        title: Annotated[str | None, "New title."] = None,
        body: Annotated[str | None, "New markdown body (replaces the old one)."] = None,
        tags: Tags = None,
        new_slug: Annotated[
            str | None, "New slug (the post's address changes)."
        ] = None,
        status: Annotated[Status | None, "New status."] = None,
    ) -> dict[str, Any]:
        return await rewrite(
            ctx,
            slug,
            lambda: posts.update(slug, title=title, body=body, tags=tags, new_slug=new_slug, status=status),
        )

    @app.tool(
        title="Publish a post",
        description=(
            "Make a draft public. Its published date is set the first time; publishing an "
            "already published post changes nothing."
        ),
        scopes=("write",),
        output_schema=WRITTEN_SCHEMA,
        annotations=writes(destructive=False, idempotent=True, open_world=True),
    )
    async def publish_post(ctx: Context, slug: Slug) -> dict[str, Any]:
        return await rewrite(ctx, slug, lambda: posts.publish(slug))

    @app.tool(
        title="Delete a post",
        description=(
            "Delete a post for good; this cannot be undone. Confirm with the user first. "
            "To hide a post instead, update_post with status 'draft'."
        ),
        scopes=("write",),
        output_schema=DELETED_SCHEMA,
        annotations=writes(destructive=True, idempotent=True, open_world=False),
    )
    def delete_post(ctx: Context, slug: Slug) -> Deferred:
        def done(post: Post) -> dict[str, Any]:
            changed(post, None)
            return {"deleted": post.slug, "title": post.title}

        return posts.delete(slug).addCallbacks(done, _as_tool_error)

    # -- resources ---------------------------------------------------------------

    @app.resource(
        POST_URI,
        name="post",
        title="Published post",
        description="A published post as markdown, with its title as the first line.",
        mime_type="text/markdown",
        scopes=("read",),
    )
    def post_resource(ctx: Context, slug: str) -> Deferred:
        # Drafts are not resources: they answer "not found" like unknown
        # slugs, so a resource URI never leaks an unpublished post.
        def render(post: Post) -> str | None:
            if post.status != PUBLISHED:
                return None
            return f"# {post.title}\n\n{post.body}"

        def missing(failure: Failure) -> None:
            failure.trap(PostNotFound)

        return posts.get(slug).addCallbacks(render, missing)

    @app.resource_list(scopes=("read",))
    def list_post_resources(ctx: Context) -> Deferred:
        async def gather() -> list[dict[str, Any]]:
            entries: list[dict[str, Any]] = []
            page = await posts.list(status=PUBLISHED, limit=MAX_LIMIT)
            while True:
                for post in page.posts:
                    entries.append(
                        {
                            "uri": post_uri(post.slug),
                            "name": post.slug,
                            "title": post.title,
                            "description": excerpt(post.body),
                            "mimeType": "text/markdown",
                        }
                    )
                if page.next_cursor is None or len(entries) >= RESOURCE_LIST_LIMIT:
                    return entries[:RESOURCE_LIST_LIMIT]
                page = await posts.list(
                    status=PUBLISHED, limit=MAX_LIMIT, cursor=page.next_cursor
                )

        return Deferred.fromCoroutine(gather())

    @app.completion(POST_URI, argument="slug")
    def complete_post_slug(ctx: Context, value: str) -> Deferred:
        return posts.slugs(value, status=PUBLISHED, limit=100)

    @app.completion("summarize_post", argument="slug")
    def complete_any_slug(ctx: Context, value: str) -> Deferred:
        return posts.slugs(value, limit=100)

    # -- prompts -----------------------------------------------------------------

    @app.prompt(
        title="Draft a post",
        description="Write a new blog post on a topic and save it as a draft.",
        scopes=("read",),
    )
    def draft_post(
        ctx: Context,
        topic: Annotated[str, "What the post is about."],
        audience: Annotated[
            str, "Who it is for (default: general readers)."
        ] = "general readers",
        length: Annotated[str, "short, medium or long (default medium)."] = "medium",
    ) -> str:
        words = {"short": "about 300", "long": "about 1500"}.get(
            length.strip().lower(), "about 700"
        )
        return (
            f"Write a blog post about: {topic}\n\n"
            f"Audience: {audience}. Length: {words} words. Use markdown with a few "
            "section headings; no title heading in the body (the title is separate).\n\n"
            "First call search_posts to check the site has not covered this already, and "
            "mention related posts by slug if there are some. Then save it with create_post "
            "(status 'draft', a concise title, two to five lowercase tags). Show me the "
            "result and ask before calling publish_post."
        )

    @app.prompt(
        title="Summarise a post",
        description="Summarise one of the site's posts.",
        scopes=("read",),
    )
    async def summarize_post(
        ctx: Context,
        slug: Annotated[str, "The post's slug."],
        style: Annotated[str, "one-line, short or detailed (default short)."] = "short",
    ) -> list[dict[str, Any]]:
        try:
            post = await posts.get(slug)
        except PostNotFound as e:
            raise invalid_params(str(e))
        how = {
            "one-line": "in a single sentence",
            "detailed": "in a few paragraphs covering every main point",
        }.get(style.strip().lower(), "in three to five bullet points")
        text = (
            f"Summarise the following post {how}.\n\n"
            f"Title: {post.title}\nTags: {', '.join(post.tags) or '(none)'}\n"
            f"Status: {post.status}\n\n---\n{post.body}\n---"
        )
        return [{"role": "user", "content": text}]

    return app
