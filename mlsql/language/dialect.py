"""The MLSQL dialect: DuckDB SQL plus BigQuery ML's statements, parsed with sqlglot.

``parse_script(text)`` splits a script into statements and parses each one.
A statement holding no ML syntax keeps its original text and runs on the engine
unchanged (even where sqlglot cannot parse it); a statement with ML syntax that
does not parse raises :class:`mlsql.errors.ParseError` with line, column and caret.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import sqlglot.errors as sqlglot_errors
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.tokens import Token, TokenType

from mlsql.errors import ParseError
from mlsql.language import expressions as mx
from mlsql.language.expressions import MLNode
from mlsql.language.functions import ML_FUNCTIONS, NO_MODEL_FUNCTIONS, TWO_INPUT_FUNCTIONS
from mlsql.language.scripts import (  # noqa: F401  (re-exported: the script-text helpers live without sqlglot)
    ML_SYNTAX,
    Statement,
    _line_col,
    _literal_sql,
    _quoted_end,
    plain_statements,
    substitute_variables,
)

__all__ = ["MLSQL", "Statement", "parse_script", "parse_one", "substitute_variables", "mx"]




MLSQL_SETTING_PREFIX = "mlsql_"  # SET mlsql_engine = 'duckdb': DuckDB has no setting of that name


class MLSQLTokenizer(DuckDB.Tokenizer):
    # DuckDB's tokenizer reads EXPLAIN as an opaque command; MLSQL parses what follows it.
    KEYWORDS = {**DuckDB.Tokenizer.KEYWORDS, "EXPLAIN": TokenType.VAR}
    # BigQuery ML users quote names with backticks (`mydataset.penguin_model`)
    IDENTIFIERS = ['"', "`"]


class MLSQLParser(DuckDB.Parser):
    FUNCTION_PARSERS = {
        **DuckDB.Parser.FUNCTION_PARSERS,
        **{name: (lambda self, _n=name: self._parse_ml_function(_n)) for name in ML_FUNCTIONS},
    }

    # -- statements --------------------------------------------------------------
    def _parse_statement(self):
        if self._curr is None:
            return None
        node = self._parse_mlsql_statement()
        if node is not None:
            return node
        return super()._parse_statement()

    def _parse_mlsql_statement(self):
        """One of MLSQL's statements, by its head words (``STATEMENTS``), or None (the tokens left
        as they were) for DuckDB's parser."""
        start = self._index
        create = self._match_text_seq("CREATE")
        replace = bool(create and self._match_text_seq("OR", "REPLACE"))
        for words, parse in STATEMENTS:
            if (words[0] == "CREATE") != bool(create):
                continue
            if self._match_text_seq(*(words[1:] if create else words)):
                node = parse(self, replace)
                if node is not None:
                    return node
                break
        self._retreat(start)
        return None

    def _parse_drop(self, cls, what: str, model: bool = False):
        exists = self._match_text_seq("IF", "EXISTS")
        name = self._parse_model_ref(allow_version=False) if model else self._parse_object_name(what)
        return self.expression(cls(this=name, exists=exists))

    def _parse_alter_job(self):
        name = self._parse_object_name("job")
        action = self._curr.text.upper() if self._curr is not None else ""
        if action not in ("PAUSE", "RESUME"):
            self.raise_error("Expected PAUSE or RESUME after ALTER JOB <name>")
        self._advance()
        return self.expression(mx.AlterJob(this=name, action=action))

    def _parse_create_alert(self, replace: bool):
        exists = self._match_text_seq("IF", "NOT", "EXISTS")
        name = self._parse_object_name("alert")
        options = self._parse_options()
        if not self._match(TokenType.ALIAS) or not self._match(TokenType.L_PAREN):
            self.raise_error("Expected AS (<query>) after CREATE ALERT's OPTIONS")
        body = self._parse_string()
        if body is None or not body.this.strip():
            self.raise_error("Expected the alert's query inside AS ( ... )")
        if not self._match(TokenType.R_PAREN):
            self.raise_error("Expected ')' after the alert's query")
        return self.expression(mx.CreateAlert(this=name, replace=replace, exists=exists, options=options, body=body))

    def _parse_create_experiment(self):
        name = self._parse_object_name("experiment")
        if not self._match(TokenType.ON) or self._curr is None or self._curr.text.upper() != "GROUP":
            self.raise_error("Expected ON GROUP '<name>' after CREATE EXPERIMENT <name>")
        self._advance()
        group = self._parse_object_name("group")
        return self.expression(mx.CreateExperiment(this=name, group=group, options=self._parse_options()))

    def _parse_stop_experiment(self):
        name = self._parse_object_name("experiment")
        promote = None
        if self._match_text_seq("PROMOTE"):
            promote = self._parse_string()
            if promote is None:
                self.raise_error("Expected the winning version after PROMOTE: PROMOTE 'model@version'")
        return self.expression(mx.StopExperiment(this=name, promote=promote))

    def _parse_deploy(self):
        ref = self._parse_model_ref()
        if not self._match_text_seq("TO"):
            self.raise_error("Expected TO DEVICE '<name>' or TO GROUP '<name>' after the model")
        kind = self._parse_target_kind()
        target = self._parse_object_name(kind.lower())
        return self.expression(mx.DeployModel(this=ref, kind=kind, target=target, options=self._parse_options()))

    def _parse_rollback(self):
        ref = self._parse_model_ref(allow_version=False)
        if not self._match(TokenType.ON):
            self.raise_error("Expected ON DEVICE '<name>' after ROLLBACK MODEL <name>")
        kind = self._parse_target_kind()
        return self.expression(mx.RollbackModel(this=ref, kind=kind, target=self._parse_object_name(kind.lower())))

    def _parse_explain(self):
        # EXPLAIN of plain SQL is DuckDB's; MLSQL's plan is for ML statements, or asked for by
        # name: EXPLAIN MLSQL <statement>
        ours = self._match_text_seq("MLSQL")
        if not ours and self._curr is not None and self._curr.text.upper() in ("ANALYZE", "ANALYSE"):
            return None
        inner = self._parse_statement()
        if inner is None:
            self.raise_error("Expected a statement after EXPLAIN")
        if not ours and not is_mlsql(inner):
            return None
        return self.expression(mx.Explain(this=inner))

    def _parse_mlsql_setting(self, reset: bool):
        # only MLSQL's own settings (mlsql_*) are ours; every other SET / RESET is DuckDB's
        head = self._prev.text
        if self._curr is None or not self._curr.text.lower().startswith(MLSQL_SETTING_PREFIX):
            return None
        name = self._parse_id_var(any_token=True)
        if reset:
            return self.expression(mx.SetVariable(this=name, expression=exp.Null()))
        if name is None or not (self._match(TokenType.EQ) or self._match_text_seq("TO")):
            self.raise_error(f"Expected {head} {name.name if name is not None else ''} = <value>")
        value = self._parse_bitwise()
        if value is None:
            self.raise_error(f"Expected a value after SET {name.name} =")
        return self.expression(mx.SetVariable(this=name, expression=value))

    def _parse_create_model(self, replace: bool):
        exists = self._match_text_seq("IF", "NOT", "EXISTS")
        ref = self._parse_model_ref(allow_version=False)
        transform = options = None
        for _ in range(2):  # TRANSFORM and OPTIONS, in either order
            if transform is None and self._match_text_seq("TRANSFORM"):
                transform = self._parse_wrapped_csv(self._parse_expression)
            elif options is None and self._match_text_seq("OPTIONS", advance=False):
                options = self._parse_options()
        if not self._match(TokenType.ALIAS):
            # an imported model (OPTIONS (model_path = ...)) needs no training query
            if not any(o.this.name.lower() == "model_path" for o in options or []):
                self.raise_error("Expected AS <query> after CREATE MODEL's OPTIONS (the training data)")
            return self.expression(mx.CreateModel(this=ref, replace=replace, exists=exists,
                                                  transform=transform, options=options))
        query = self._parse_statement()
        if query is None:
            self.raise_error("Expected the training query after AS")
        return self.expression(mx.CreateModel(this=ref, replace=replace, exists=exists,
                                              transform=transform, options=options, query=query))

    def _parse_create_job(self, replace: bool):
        exists = self._match_text_seq("IF", "NOT", "EXISTS")
        name = self._parse_object_name("job")
        options = self._parse_options()
        if not self._match(TokenType.ALIAS):
            self.raise_error("Expected AS NOTEBOOK '<path>' or AS (<statements>) after CREATE JOB's OPTIONS")
        if self._match_text_seq("NOTEBOOK"):
            nb = self._parse_string()
            if nb is None:
                self.raise_error("Expected the notebook path as a string after AS NOTEBOOK")
            return self.expression(mx.CreateJob(this=name, replace=replace, exists=exists, options=options, notebook=nb))
        if not self._match(TokenType.L_PAREN):
            self.raise_error("Expected AS NOTEBOOK '<path>' or AS (<statements>) after CREATE JOB's OPTIONS")
        body = self._parse_string()
        if body is None or not body.this.strip():
            self.raise_error("Expected the job's statements inside AS ( ... )")
        if not self._match(TokenType.R_PAREN):
            self.raise_error("Expected ')' after the job's statements")
        return self.expression(mx.CreateJob(this=name, replace=replace, exists=exists, options=options, body=body))

    def _parse_create_feature_view(self, replace: bool):
        exists = self._match_text_seq("IF", "NOT", "EXISTS")
        name = self._parse_object_name("feature view")
        options = self._parse_options()
        if not self._match(TokenType.ALIAS):
            self.raise_error("Expected AS SELECT ... after CREATE FEATURE VIEW's OPTIONS")
        query = self._parse_statement()
        if query is None:
            self.raise_error("Expected the feature view's SELECT after AS")
        return self.expression(mx.CreateFeatureView(this=name, replace=replace, exists=exists, options=options,
                                                    query=query))

    def _parse_named(self, cls, replace: bool):
        exists = self._match_text_seq("IF", "NOT", "EXISTS")
        name = self._parse_object_name("device group" if cls is mx.CreateDeviceGroup else "device")
        return self.expression(cls(this=name, replace=replace, exists=exists, options=self._parse_options()))

    def _parse_target_kind(self) -> str:
        if self._match_text_seq("DEVICE"):
            return "DEVICE"
        if self._curr is not None and self._curr.text.upper() == "GROUP":
            self._advance()
            return "GROUP"
        self.raise_error("Expected DEVICE or GROUP")
        return "DEVICE"

    def _parse_object_name(self, what: str):
        name = self._parse_string() or self._parse_id_var(any_token=False)
        if name is None:
            self.raise_error(f"Expected the {what} name")
        return name

    def _parse_options(self) -> list[exp.Expression] | None:
        if not self._match_text_seq("OPTIONS"):
            return None
        return self._parse_wrapped_csv(self._parse_option)

    def _parse_option(self):
        key = self._parse_id_var(any_token=True)
        if key is None:
            self.raise_error("Expected an option name")
        if not self._match(TokenType.EQ):
            self.raise_error(f"Expected '=' after option {key.name}")
        first = self._curr
        value = self._spanned(first, self._parse_bitwise())
        if value is None:
            self.raise_error(f"Expected a value for option {key.name}")
        return self.expression(exp.EQ(this=key, expression=value))

    def _spanned(self, first: Token | None, node: exp.Expression | None) -> exp.Expression | None:
        """``node`` placed over all its tokens, ``first`` to the last one read (an option's value
        ``-1`` or ``['a', 'b']``, an ML function's input ``(SELECT ...)``): an error about it
        points at the whole of it (mlsql.language.positions)."""
        if node is not None and first is not None and self._prev is not None:
            node.update_positions(line=first.line, col=first.col, start=first.start, end=self._prev.end)
        return node

    # -- model references and ML table functions ---------------------------------
    def _parse_model_ref(self, allow_version: bool = True) -> mx.ModelRef:
        ident = self._parse_id_var(any_token=False)
        if ident is None:
            self.raise_error("Expected a model name")
        version = alias = None
        if self._curr is not None and self._curr.text == "@" and self._prev.end + 1 == self._curr.start:
            self._advance()
            tok = self._curr
            if tok is None or tok.token_type not in (TokenType.NUMBER, TokenType.VAR) and not tok.text.isidentifier():
                self.raise_error("Expected a version number or alias after '@'")
            self._advance()
            if tok.token_type == TokenType.NUMBER:
                nxt = self._curr
                if not tok.text.isdigit() or (nxt is not None and nxt.text in (".", "e", "E") and nxt.start == tok.end + 1):
                    self.raise_error(f"Model version must be a whole number, got {tok.text}{nxt.text if nxt else ''}...")
                version = tok.text
            else:
                alias = tok.text
        elif self._match_text_seq("VERSION"):
            tok = self._curr
            if tok is None or tok.token_type != TokenType.NUMBER or not tok.text.isdigit():
                self.raise_error("Expected a version number after VERSION")
            self._advance()
            version = tok.text
        if not allow_version and (version or alias):
            self.raise_error("A model version or alias is not allowed here")
        return self.expression(mx.ModelRef(this=ident, version=version, alias=alias))

    def _expect_arg_end(self, name: str) -> bool:
        if self._curr is not None and self._curr.token_type != TokenType.R_PAREN:
            self.raise_error(f"Expected ',' or ')' in ML.{name}(...), found '{self._curr.text}'")
        return False

    def _parse_ml_function(self, name: str):
        toks = self._tokens
        i = self._index  # tokens: ML . NAME ( <here>
        is_ml = i >= 4 and toks[i - 3].token_type == TokenType.DOT and toks[i - 4].text.upper() == "ML"
        if not is_ml:  # a plain function that happens to share the name
            args = self._parse_csv(self._parse_lambda)
            return self.expression(exp.Anonymous(this=toks[i - 2].text, expressions=args))
        model = input_ = study = settings = None
        extra: list[exp.Expression] = []
        if name in NO_MODEL_FUNCTIONS:  # its arguments from the first: inputs, values, settings
            more = self._curr is not None and self._curr.token_type != TokenType.R_PAREN
        else:
            if not self._match_text_seq("MODEL"):
                self.raise_error(f"ML.{name} expects MODEL <name> as its first argument")
            model = self._parse_model_ref()
            more = self._match(TokenType.COMMA) or self._expect_arg_end(name)
        while more:
            src = None
            if name in NO_MODEL_FUNCTIONS and model is None and self._match_text_seq("MODEL"):
                model = self._parse_model_ref()  # ML.DEVICE_DATA('d', MODEL m): a model later, optional
            elif self._match(TokenType.TABLE):
                src = self._spanned(self._curr, self._parse_table_parts())
            elif (self._curr is not None and self._curr.token_type == TokenType.L_PAREN
                  and (input_ is None or (study is None and name in TWO_INPUT_FUNCTIONS))):
                src = self._spanned(self._curr, self._parse_table())
                if not isinstance(src, exp.Subquery):
                    self.raise_error(f"ML.{name} input must be TABLE <name> or a (SELECT ...) query")
            else:
                arg = self._parse_bitwise()
                if isinstance(arg, exp.Struct):
                    settings = arg
                elif arg is not None:
                    extra.append(arg)
                else:
                    self.raise_error(f"Unexpected argument to ML.{name}")
            if src is not None:
                if input_ is None:
                    input_ = src
                elif study is None and name in TWO_INPUT_FUNCTIONS:
                    study = src
                else:
                    self.raise_error(f"ML.{name} takes {'two inputs' if name in TWO_INPUT_FUNCTIONS else 'one input'}")
            more = self._match(TokenType.COMMA) or self._expect_arg_end(name)
        if name in TWO_INPUT_FUNCTIONS and study is None:
            self.raise_error(f"ML.{name} compares two inputs: ML.{name}(TABLE base | (query), TABLE study | (query))")
        return self.expression(mx.MLFunction(this=name, model=model, input=input_, study=study, settings=settings,
                                             expressions=extra or None))


# -- generation -------------------------------------------------------------------
def _opts_sql(gen, e) -> str:
    opts = e.args.get("options")
    if not opts:
        return ""
    return " OPTIONS (" + ", ".join(gen.sql(o) for o in opts) + ")"


def _model_ref_sql(gen, e: mx.ModelRef) -> str:
    tail = ""
    if e.args.get("version") is not None:
        tail = f"@{e.args['version']}"
    elif e.args.get("alias"):
        tail = f"@{e.args['alias']}"
    return gen.sql(e.this) + tail


def _create_model_sql(gen, e: mx.CreateModel) -> str:
    parts = ["CREATE"]
    if e.args.get("replace"):
        parts.append("OR REPLACE")
    parts.append("MODEL")
    if e.args.get("exists"):
        parts.append("IF NOT EXISTS")
    parts.append(gen.sql(e.this))
    text = " ".join(parts)
    if e.args.get("transform"):
        text += " TRANSFORM (" + ", ".join(gen.sql(t) for t in e.args["transform"]) + ")"
    query = e.args.get("query")
    return text + _opts_sql(gen, e) + (" AS " + gen.sql(query) if query is not None else "")


def _ml_function_sql(gen, e: mx.MLFunction) -> str:
    parts = []
    if e.args.get("model") is not None:
        parts.append("MODEL " + gen.sql(e.args["model"]))
    for src in (e.args.get("input"), e.args.get("study")):
        if src is not None:
            parts.append(("TABLE " + gen.sql(src)) if isinstance(src, exp.Table) else gen.sql(src))
    parts += [gen.sql(x) for x in e.args.get("expressions") or []]
    if e.args.get("settings") is not None:
        parts.append(_literal_sql(e.settings()))
    return f"{e.func}({', '.join(parts)})"


def _named_sql(keyword: str):
    def gen_sql(gen, e) -> str:
        head = keyword
        if e.args.get("replace"):
            head = head.replace("CREATE", "CREATE OR REPLACE", 1)
        if e.args.get("exists"):
            head += " IF EXISTS" if head.startswith("DROP") else " IF NOT EXISTS"
        text = f"{head} {gen.sql(e.this)}" + _opts_sql(gen, e)
        if isinstance(e, mx.CreateJob):
            text += (" AS NOTEBOOK " + gen.sql(e.args["notebook"]) if e.args.get("notebook") is not None
                     else f" AS ({e.body})")
        elif isinstance(e, mx.CreateAlert):
            text += f" AS ({e.body})"
        elif isinstance(e, mx.CreateFeatureView):
            text += " AS " + gen.sql(e.query)
        return text

    return gen_sql


# MLSQL's statements by their head words -> how the rest parses (the parser's own table, as sqlglot
# keeps STATEMENT_PARSERS by token): longest heads first, so that DROP DEVICE GROUP is tried before
# DROP DEVICE; a CREATE head also takes CREATE OR REPLACE. The planner's table (mlsql.plan.planner.
# STATEMENTS) maps each node made here to its steps.
STATEMENTS: list[tuple[tuple[str, ...], Callable[[MLSQLParser, bool], exp.Expression | None]]] = sorted([
    (("CREATE", "MODEL"), lambda p, replace: p._parse_create_model(replace)),
    (("CREATE", "DEVICE", "GROUP"), lambda p, replace: p._parse_named(mx.CreateDeviceGroup, replace=replace)),
    (("CREATE", "DEVICE"), lambda p, replace: p._parse_named(mx.CreateDevice, replace=replace)),
    (("CREATE", "JOB"), lambda p, replace: p._parse_create_job(replace)),
    (("SHOW", "MODELS"), lambda p, _: p.expression(mx.ShowModels())),
    (("SHOW", "DEVICES"), lambda p, _: p.expression(mx.ShowDevices())),
    (("SHOW", "DEPLOYMENTS"), lambda p, _: p.expression(mx.ShowDeployments())),
    (("SHOW", "JOBS"), lambda p, _: p.expression(mx.ShowJobs())),
    (("DESCRIBE", "MODEL"), lambda p, _: p.expression(mx.DescribeModel(this=p._parse_model_ref()))),
    (("DESCRIBE", "JOB"), lambda p, _: p.expression(mx.DescribeJob(this=p._parse_object_name("job")))),
    (("DROP", "MODEL"), lambda p, _: p._parse_drop(mx.DropModel, "model", model=True)),
    (("DROP", "DEVICE", "GROUP"), lambda p, _: p._parse_drop(mx.DropDeviceGroup, "device group")),
    (("DROP", "DEVICE"), lambda p, _: p._parse_drop(mx.DropDevice, "device")),
    (("DROP", "JOB"), lambda p, _: p._parse_drop(mx.DropJob, "job")),
    (("RUN", "JOB"), lambda p, _: p.expression(mx.RunJob(this=p._parse_object_name("job")))),
    (("ALTER", "JOB"), lambda p, _: p._parse_alter_job()),
    (("CREATE", "ALERT"), lambda p, replace: p._parse_create_alert(replace)),
    (("SHOW", "ALERTS"), lambda p, _: p.expression(mx.ShowAlerts())),
    (("DESCRIBE", "ALERT"), lambda p, _: p.expression(mx.DescribeAlert(this=p._parse_object_name("alert")))),
    (("DROP", "ALERT"), lambda p, _: p._parse_drop(mx.DropAlert, "alert")),
    (("CHECK", "ALERT"), lambda p, _: p.expression(mx.CheckAlert(this=p._parse_object_name("alert")))),
    (("CREATE", "FEATURE", "VIEW"), lambda p, replace: p._parse_create_feature_view(replace)),
    (("SHOW", "FEATURE", "VIEWS"), lambda p, _: p.expression(mx.ShowFeatureViews())),
    (("DESCRIBE", "FEATURE", "VIEW"), lambda p, _: p.expression(
        mx.DescribeFeatureView(this=p._parse_object_name("feature view")))),
    (("DROP", "FEATURE", "VIEW"), lambda p, _: p._parse_drop(mx.DropFeatureView, "feature view")),
    (("EXPORT", "MODEL"), lambda p, _: p.expression(mx.ExportModel(this=p._parse_model_ref(),
                                                                    options=p._parse_options()))),
    (("DEPLOY", "MODEL"), lambda p, _: p._parse_deploy()),
    (("ROLLBACK", "MODEL"), lambda p, _: p._parse_rollback()),
    (("CREATE", "EXPERIMENT"), lambda p, _: p._parse_create_experiment()),
    (("STOP", "EXPERIMENT"), lambda p, _: p._parse_stop_experiment()),
    (("SHOW", "EXPERIMENTS"), lambda p, _: p.expression(mx.ShowExperiments())),
    (("EXPLAIN",), lambda p, _: p._parse_explain()),
    (("SET",), lambda p, _: p._parse_mlsql_setting(reset=False)),
    (("RESET",), lambda p, _: p._parse_mlsql_setting(reset=True)),
], key=lambda entry: -len(entry[0]))


class MLSQLGenerator(DuckDB.Generator):
    TRANSFORMS = {
        **DuckDB.Generator.TRANSFORMS,
        mx.ModelRef: _model_ref_sql,
        mx.CreateModel: _create_model_sql,
        mx.MLFunction: _ml_function_sql,
        mx.ShowModels: lambda g, e: "SHOW MODELS",
        mx.ShowDevices: lambda g, e: "SHOW DEVICES",
        mx.ShowDeployments: lambda g, e: "SHOW DEPLOYMENTS",
        mx.ShowJobs: lambda g, e: "SHOW JOBS",
        mx.DescribeModel: lambda g, e: "DESCRIBE MODEL " + g.sql(e.this),
        mx.DropModel: lambda g, e: "DROP MODEL " + ("IF EXISTS " if e.args.get("exists") else "") + g.sql(e.this),
        mx.DropDevice: _named_sql("DROP DEVICE"),
        mx.DropDeviceGroup: _named_sql("DROP DEVICE GROUP"),
        mx.DropJob: _named_sql("DROP JOB"),
        mx.CreateDevice: _named_sql("CREATE DEVICE"),
        mx.CreateDeviceGroup: _named_sql("CREATE DEVICE GROUP"),
        mx.CreateJob: _named_sql("CREATE JOB"),
        mx.DescribeJob: _named_sql("DESCRIBE JOB"),
        mx.RunJob: _named_sql("RUN JOB"),
        mx.AlterJob: lambda g, e: f"ALTER JOB {g.sql(e.this)} {e.args['action']}",
        mx.ShowAlerts: lambda g, e: "SHOW ALERTS",
        mx.CreateAlert: _named_sql("CREATE ALERT"),
        mx.DropAlert: _named_sql("DROP ALERT"),
        mx.DescribeAlert: _named_sql("DESCRIBE ALERT"),
        mx.CheckAlert: _named_sql("CHECK ALERT"),
        mx.CreateFeatureView: _named_sql("CREATE FEATURE VIEW"),
        mx.ShowFeatureViews: lambda g, e: "SHOW FEATURE VIEWS",
        mx.DescribeFeatureView: _named_sql("DESCRIBE FEATURE VIEW"),
        mx.DropFeatureView: _named_sql("DROP FEATURE VIEW"),
        # plain SQL under EXPLAIN means DuckDB's; MLSQL's plan of it is spelled EXPLAIN MLSQL
        mx.Explain: lambda g, e: "EXPLAIN " + ("" if any(isinstance(n, MLNode) for n in e.this.walk()) else "MLSQL ")
        + g.sql(e.this),
        mx.SetVariable: lambda g, e: f"SET {g.sql(e.this)} = {g.sql(e.expression)}",
        mx.ExportModel: lambda g, e: "EXPORT MODEL " + g.sql(e.this) + _opts_sql(g, e),
        mx.DeployModel: lambda g, e: (
            f"DEPLOY MODEL {g.sql(e.this)} TO {e.args['kind']} {g.sql(e.args['target'])}" + _opts_sql(g, e)
        ),
        mx.RollbackModel: lambda g, e: f"ROLLBACK MODEL {g.sql(e.this)} ON {e.args['kind']} {g.sql(e.args['target'])}",
        mx.CreateExperiment: lambda g, e: f"CREATE EXPERIMENT {g.sql(e.this)} ON GROUP {g.sql(e.args['group'])}"
        + _opts_sql(g, e),
        mx.StopExperiment: lambda g, e: f"STOP EXPERIMENT {g.sql(e.this)}"
        + (f" PROMOTE {g.sql(e.args['promote'])}" if e.args.get("promote") else ""),
        mx.ShowExperiments: lambda g, e: "SHOW EXPERIMENTS",
    }


class MLSQL(DuckDB):
    """sqlglot dialect ``"mlsql"``: DuckDB plus the ML statements."""

    Tokenizer = MLSQLTokenizer
    Parser = MLSQLParser
    Generator = MLSQLGenerator


_DIALECT = MLSQL()


# -- scripts --------------------------------------------------------------------
# the heads that make a statement MLSQL's before it parses (EXPLAIN, SET and RESET are DuckDB's too:
# _looks_ml looks at what follows them)
_ML_HEADS = {w for w, _ in STATEMENTS if w[0] not in ("EXPLAIN", "SET", "RESET")} | {
    ("CREATE", "OR", "REPLACE", *w[1:]) for w, _ in STATEMENTS if w[0] == "CREATE"}


def _looks_ml(tokens: list[Token]) -> bool:
    words = tuple(t.text.upper() for t in tokens[:4] if t.token_type != TokenType.STRING)
    if any(words[: len(h)] == h for h in _ML_HEADS):
        return True
    if words[:2] == ("EXPLAIN", "MLSQL"):
        return True
    if words[:1] == ("EXPLAIN",) and words[1:2] not in (("ANALYZE",), ("ANALYSE",)):
        return _looks_ml(tokens[1:]) or any(
            a.text.upper() == "ML" and b.token_type == TokenType.DOT for a, b in zip(tokens, tokens[1:])
        )
    return any(a.text.upper() == "ML" and b.token_type == TokenType.DOT for a, b in zip(tokens, tokens[1:]))


def _split(tokens: list[Token]) -> list[list[Token]]:
    """Statements at top-level ``;`` (a ``;`` inside parentheses belongs to a CREATE JOB's body)."""
    chunks, cur = [], []
    depth = 0
    for t in tokens:
        if t.token_type == TokenType.L_PAREN:
            depth += 1
        elif t.token_type == TokenType.R_PAREN:
            depth = max(0, depth - 1)
        if t.token_type == TokenType.SEMICOLON and depth == 0:
            if cur:
                chunks.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        chunks.append(cur)
    return chunks


def _job_body_as_string(chunk: list[Token], text: str) -> list[Token]:
    """``CREATE JOB … AS ( <statements> )`` and ``CREATE ALERT … AS ( <query> )``: the body, semicolons
    and all, as one string token, so the statement parses as ``AS ('<statements>')`` and the body
    keeps its exact text."""
    words = [t.text.upper() for t in chunk[:4]]
    head = words[3:4] if words[1:3] == ["OR", "REPLACE"] else words[1:2]
    if words[:1] != ["CREATE"] or head not in (["JOB"], ["ALERT"]):
        return chunk
    for i, t in enumerate(chunk[:-1]):
        if t.token_type == TokenType.ALIAS and chunk[i + 1].token_type == TokenType.L_PAREN:
            depth = 0
            for j in range(i + 1, len(chunk)):
                if chunk[j].token_type == TokenType.L_PAREN:
                    depth += 1
                elif chunk[j].token_type == TokenType.R_PAREN:
                    depth -= 1
                    if depth == 0:
                        open_, close = chunk[i + 1], chunk[j]
                        if j == i + 2:
                            return chunk  # empty body: the parser says what is missing
                        body = Token(TokenType.STRING, text[open_.end + 1: close.start].strip(), line=chunk[i + 2].line,
                                     col=chunk[i + 2].col, start=chunk[i + 2].start, end=chunk[j - 1].end)
                        return chunk[: i + 2] + [body] + chunk[j:]
            return chunk
    return chunk


def _parse_error(exc: sqlglot_errors.ParseError, text: str, chunk: list[Token]) -> ParseError:
    err = exc.errors[0] if exc.errors else {}
    desc = (err.get("description") or str(exc)).strip()
    line, col = err.get("line"), err.get("col")
    if line is None or col is None:
        last = chunk[-1]
        line, col = _line_col(text, last.end)
    else:
        # sqlglot points at the end of the offending token; point at its start
        hl = err.get("highlight") or ""
        col = max(1, col - len(hl) + 1) if hl else col
    return ParseError(desc, sql=text, line=line, col=col)


def parse_script(text: str) -> list[Statement]:
    """Split ``text`` at top-level ``;`` and parse each statement."""
    try:
        tokens = _DIALECT.tokenize(text)
    except sqlglot_errors.TokenError as exc:
        if re.search(r"\bML\s*\.|\bMODEL\b", text, re.IGNORECASE):
            raise ParseError(f"Cannot read the statement: {exc}") from None
        return [Statement(sql=text.strip().rstrip(";"), expression=None, start=0, line=1)] if text.strip() else []
    out: list[Statement] = []
    for chunk in _split(tokens):
        chunk = _job_body_as_string(chunk, text)
        start = chunk[0].start
        # leading comments belong to the first token; keep the statement text from its first token
        sql = text[start: chunk[-1].end + 1]
        line = text.count("\n", 0, start) + 1
        ml = _looks_ml(chunk)
        try:
            parser = _DIALECT.parser()
            trees = parser.parse(chunk, text)
            tree = trees[0] if trees else None
        except sqlglot_errors.ParseError as exc:
            if ml:
                raise _parse_error(exc, text, chunk) from None
            tree = None
        except Exception:  # sqlglot internals on exotic DuckDB syntax: pass the text through
            if ml:
                raise
            tree = None
        out.append(Statement(sql=sql, expression=tree, start=start, line=line, is_ml=is_mlsql(tree)))
    return out


def is_mlsql(tree: exp.Expression | None) -> bool:
    """Whether a statement is MLSQL's own (a node of ``mlsql.language.expressions`` anywhere in it),
    and so is planned into steps; otherwise its text goes to the engine as typed. Decided here
    only: the script's ``is_ml`` and the planner's EXPLAIN both ask this. (Before a tree exists,
    ``_looks_ml`` only decides whether a statement that does not parse is an error or DuckDB's to
    read, and ``mlsql.language.scripts.ML_SYNTAX`` whether a script is worth parsing at all.)"""
    return tree is not None and any(isinstance(n, MLNode) for n in tree.walk())


def parse_one(text: str) -> exp.Expression:
    """Parse exactly one statement (for tests and tools)."""
    stmts = parse_script(text)
    if len(stmts) != 1 or stmts[0].expression is None:
        raise ParseError(f"Expected exactly one parseable statement, got {len(stmts)}")
    return stmts[0].expression


