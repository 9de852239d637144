"""The value of one SQL VALUES entry, evaluated: the constant expressions dump tools write, and nothing else.

Dumps spell text in more ways than a quoted literal: the sqlite3 shell writes a string holding a newline as
`replace('a\\nb','\\n',char(10))` (and `unistr('a\\u000ab')` from 3.50 on), PostgreSQL takes `E'a\\nb'`,
MySQL `_utf8mb4'..'` and `0x..`, all of them `X'..'` and `'a' || 'b'`. Each is evaluated to the text it
stands for; any other expression (NOW(), a cast, a column) is an error naming where it is, never kept as
its source text: a model would learn `replace(...)` as data.
"""
from __future__ import annotations

import re

from sqlparse import tokens as T

from jaxtune.errors import JaxtuneError

CONSTANTS = {"NULL": None, "TRUE": True, "FALSE": False}
MYSQL_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a", "%": "\\%", "_": "\\_"}
C_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}  # PostgreSQL's E'..' and COPY
E_STRING = re.compile(r"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|([\s\S]))")
UNISTR = re.compile(r"\\(?:([0-9a-fA-F]{4})|u([0-9a-fA-F]{4})|\+([0-9a-fA-F]{6})|U([0-9a-fA-F]{8})|(\\)|())")
KNOWN = "literals, ||, replace(), char(), unistr(), X'..', E'..', 0x.. and _charset introducers"


def c_escapes(body: str, unicode: bool = True, where: str = "") -> str:
    """PostgreSQL's backslash escapes: \\b \\f \\n \\r \\t \\v, octal, \\x hex, and \\u / \\U in E'..'
    strings (`unicode`; COPY's text format has none: there `\\u` is `u`); any other `\\c` is c."""
    def one(m):
        octal, hexa, u4, u8, char = m.groups()
        if (u4 or u8) and not unicode:
            return m[0][1:]
        if char is not None:
            return C_ESCAPES.get(char, char)
        return _char(int(octal, 8) if octal else int(hexa or u4 or u8, 16), where)
    if "\\" not in body:
        return body
    text = E_STRING.sub(one, body)
    try:  # \uD83D\uDE00: a surrogate pair is one character
        return text.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        raise JaxtuneError(f"{where}: {body!r} holds a lone UTF-16 surrogate, which is no character") from None


def _unistr(text: str, where: str) -> str:
    """SQLite's unistr(): \\XXXX, \\uXXXX, \\+XXXXXX, \\UXXXXXXXX and \\\\; any other backslash is an error."""
    def one(m):
        if m[6] is not None:
            raise JaxtuneError(f"{where}: unistr({text!r}) holds a backslash that is not an escape SQLite knows")
        return "\\" if m[5] else _char(int(m[1] or m[2] or m[3] or m[4], 16), where)
    return UNISTR.sub(one, text)


def _char(code: int, where: str = "") -> str:
    """chr(code), or an error naming the place when no character has that code."""
    if not 0 <= code <= 0x10FFFF:
        raise JaxtuneError(f"{where}: {code:#x} is not a Unicode code point")
    return chr(code)


def _hex_text(digits: str, where: str) -> str:
    try:
        return bytes.fromhex(digits).decode("utf-8")
    except ValueError:
        raise JaxtuneError(f"{where}: binary data ({'0x' + digits[:16]}{'...' * (len(digits) > 16)}) is not UTF-8 text; "
                           "leave the column out of --map, or convert it to text before dumping") from None


def _string(token: str, mysql: bool) -> str:
    quote, body = token[0], token[1:-1]
    if not mysql:
        return body.replace(quote * 2, quote)
    return re.sub(rf"\\([\s\S])|{quote}{quote}",
                  lambda m: quote if m[1] is None else MYSQL_ESCAPES.get(m[1], m[1]), body)


def _text(value) -> str:
    """A value as SQL's || and text functions see it."""
    if isinstance(value, bool):
        return str(int(value))
    return value if isinstance(value, str) else repr(value)


class _Tokens:
    """A cursor over one value's tokens: (ttype, text, line, column)."""

    def __init__(self, tokens: list[tuple], mysql: bool, where):
        self.tokens, self.i, self.mysql, self.where = tokens, 0, mysql, where

    def peek(self, ahead: int = 0):
        i = self.i + ahead
        return self.tokens[i] if i < len(self.tokens) else None

    def take(self):
        token = self.peek()
        if token is None:
            raise self.error(None, "ends early")
        self.i += 1
        return token

    def error(self, token, what: str) -> JaxtuneError:
        token = token or (self.tokens[-1] if self.tokens else None)
        source = " ".join(t[1] for t in self.tokens)
        return JaxtuneError(f"{self.where(token)}: {source!r} {what}; jaxtune evaluates {KNOWN}, "
                            "and never keeps an expression's text as data (no file was written). Dump the table "
                            "with plain values")


def evaluate(tokens: list[tuple], mysql: bool, where) -> object:
    """The value of one VALUES entry (str, int, float, bool or None); `where(token)` names a token's place."""
    cursor = _Tokens(tokens, mysql, where)
    value = _concatenation(cursor)
    if cursor.peek() is not None:
        raise cursor.error(cursor.peek(), "is not a value jaxtune can evaluate")
    return value


def _concatenation(c: _Tokens):
    value = _term(c)
    while c.peek() is not None and c.peek()[1] == "||":
        c.take()
        right = _term(c)
        value = None if value is None or right is None else _text(value) + _text(right)
    return value


def _is_string(c: _Tokens, token) -> bool:
    """A quoted string: '..' (and in MySQL ".." too; elsewhere that names a column)."""
    return token is not None and (token[0] in T.String.Single or (c.mysql and token[0] in T.String.Symbol))


def _strings(c: _Tokens) -> str:
    """One string literal, or several written side by side ('abc' 'def' is 'abcdef', as SQL reads it)."""
    text = ""
    while _is_string(c, c.peek()):
        text += _string(c.take()[1], c.mysql)
    return text


def _term(c: _Tokens):
    token = c.take()
    ttype, text = token[0], token[1]
    upper = text.upper()
    if _is_string(c, token):
        c.i -= 1
        return _strings(c)
    if ttype in T.String.Escape:  # PostgreSQL E'..'
        return c_escapes(text[2:-1].replace("''", "'"), where=c.where(token))
    if ttype in T.Number.Integer:
        return int(text)
    if ttype in T.Number.Float:
        return float(text)
    if ttype in T.Number.Hexadecimal:  # MySQL 0x..
        return _hex_text(text[2:], c.where(token))
    if text in ("-", "+") and c.peek() is not None and (c.peek()[0] in T.Number.Integer or c.peek()[0] in T.Number.Float):
        number = _term(c)
        return -number if text == "-" else number
    if upper == "X" and _is_string(c, c.peek()):  # X'..': a blob literal
        return _hex_text(c.take()[1][1:-1], c.where(token))
    if upper == "B" and _is_string(c, c.peek()):  # B'101': PostgreSQL's bit string, as its text
        return c.take()[1][1:-1]
    if upper in CONSTANTS:
        return CONSTANTS[upper]
    if text.startswith("_") and (_is_string(c, c.peek()) or (c.peek() is not None and c.peek()[0] in T.Number.Hexadecimal)):
        return _term(c)  # MySQL's charset introducer: _utf8mb4'..', _binary 0x..
    if c.peek() is not None and c.peek()[1] == "(":
        return _call(c, token)
    raise c.error(token, f"holds {text!r}, which is not a value")


def _call(c: _Tokens, name_token):
    c.take()  # (
    args = []
    while c.peek() is not None and c.peek()[1] != ")":
        args.append(_concatenation(c))
        if c.peek() is not None and c.peek()[1] == ",":
            c.take()
    c.take()  # )
    name = name_token[1].lower()
    if None in args and name in ("replace", "char", "unistr"):
        return None
    if name == "replace" and len(args) == 3:
        text, old, new = map(_text, args)
        return text.replace(old, new) if old else text
    if name == "char" and all(isinstance(a, int) for a in args):
        return "".join(_char(a, c.where(name_token)) for a in args)
    if name == "unistr" and len(args) == 1 and isinstance(args[0], str):
        return _unistr(args[0], c.where(name_token))
    raise c.error(name_token, f"calls {name}(), which jaxtune does not evaluate")
