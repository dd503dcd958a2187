// A small JSON reader and writer (RFC 8259) shared by the .NET 8 and Mono builds: Mono has no
// System.Text.Json, and the client only needs objects, arrays, strings, numbers, booleans and null.
// Values map to Dictionary<string, object>, List<object>, string, double, bool and null.
using System;
using System.Collections.Generic;
using System.Globalization;
using System.Text;

namespace Gateway.Client
{
    public sealed class JsonException : Exception
    {
        public JsonException(string message) : base(message) { }
    }

    public static class Json
    {
        const int MaxDepth = 64;

        public static object Parse(string text)
        {
            var reader = new Reader(text);
            object value = reader.Value(0);
            reader.SkipSpace();
            if (!reader.AtEnd) throw reader.Error("trailing characters after the JSON value");
            return value;
        }

        public static string Write(object value)
        {
            var sb = new StringBuilder();
            WriteValue(sb, value);
            return sb.ToString();
        }

        /// <summary>Follows a path of object keys and array indexes; null when any step is missing.</summary>
        public static object At(object value, params object[] path)
        {
            foreach (object step in path)
            {
                var obj = value as Dictionary<string, object>;
                var list = value as List<object>;
                if (step is string && obj != null && obj.ContainsKey((string)step)) value = obj[(string)step];
                else if (step is int && list != null && (int)step < list.Count) value = list[(int)step];
                else return null;
            }
            return value;
        }

        /// <summary>A scalar as the text a person would read: numbers without a trailing ".0", null as "-".</summary>
        public static string Text(object value)
        {
            if (value == null) return "-";
            if (value is double) return ((double)value).ToString("R", CultureInfo.InvariantCulture);
            if (value is bool) return (bool)value ? "true" : "false";
            if (value is string) return (string)value;
            return Write(value);
        }

        static void WriteValue(StringBuilder sb, object value)
        {
            if (value == null) { sb.Append("null"); return; }
            if (value is string) { WriteString(sb, (string)value); return; }
            if (value is bool) { sb.Append((bool)value ? "true" : "false"); return; }
            if (value is int || value is long) { sb.Append(Convert.ToInt64(value).ToString(CultureInfo.InvariantCulture)); return; }
            if (value is double)
            {
                double d = (double)value;
                if (double.IsNaN(d) || double.IsInfinity(d)) throw new JsonException("JSON has no NaN or Infinity");
                sb.Append(d.ToString("R", CultureInfo.InvariantCulture));
                return;
            }
            var obj = value as IDictionary<string, object>;
            if (obj != null)
            {
                sb.Append('{');
                bool first = true;
                foreach (KeyValuePair<string, object> pair in obj)
                {
                    if (!first) sb.Append(',');
                    first = false;
                    WriteString(sb, pair.Key);
                    sb.Append(':');
                    WriteValue(sb, pair.Value);
                }
                sb.Append('}');
                return;
            }
            var list = value as IList<object>;
            if (list == null) throw new JsonException("cannot write a " + value.GetType().Name + " as JSON");
            sb.Append('[');
            for (int i = 0; i < list.Count; i++)
            {
                if (i > 0) sb.Append(',');
                WriteValue(sb, list[i]);
            }
            sb.Append(']');
        }

        static void WriteString(StringBuilder sb, string s)
        {
            sb.Append('"');
            foreach (char c in s)
            {
                switch (c)
                {
                    case '"': sb.Append("\\\""); break;
                    case '\\': sb.Append("\\\\"); break;
                    case '\n': sb.Append("\\n"); break;
                    case '\r': sb.Append("\\r"); break;
                    case '\t': sb.Append("\\t"); break;
                    default:
                        if (c < 0x20) sb.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                        else sb.Append(c);
                        break;
                }
            }
            sb.Append('"');
        }

        sealed class Reader
        {
            readonly string _s;
            int _i;

            public Reader(string s) { _s = s ?? ""; }

            public bool AtEnd { get { return _i >= _s.Length; } }

            public JsonException Error(string what)
            {
                return new JsonException("invalid JSON at offset " + _i + ": " + what);
            }

            public void SkipSpace()
            {
                while (_i < _s.Length && (_s[_i] == ' ' || _s[_i] == '\t' || _s[_i] == '\n' || _s[_i] == '\r')) _i++;
            }

            public object Value(int depth)
            {
                if (depth > MaxDepth) throw Error("nested too deeply");
                SkipSpace();
                if (AtEnd) throw Error("unexpected end");
                char c = _s[_i];
                if (c == '{') return Object(depth);
                if (c == '[') return Array(depth);
                if (c == '"') return String();
                if (c == '-' || (c >= '0' && c <= '9')) return Number();
                if (Literal("true")) return true;
                if (Literal("false")) return false;
                if (Literal("null")) return null;
                throw Error("unexpected character '" + c + "'");
            }

            bool Literal(string word)
            {
                if (string.CompareOrdinal(_s, _i, word, 0, word.Length) != 0) return false;
                _i += word.Length;
                return true;
            }

            void Expect(char c)
            {
                SkipSpace();
                if (AtEnd || _s[_i] != c) throw Error("expected '" + c + "'");
                _i++;
            }

            Dictionary<string, object> Object(int depth)
            {
                var obj = new Dictionary<string, object>();
                Expect('{');
                SkipSpace();
                if (!AtEnd && _s[_i] == '}') { _i++; return obj; }
                while (true)
                {
                    SkipSpace();
                    if (AtEnd || _s[_i] != '"') throw Error("expected a member name");
                    string key = String();
                    Expect(':');
                    obj[key] = Value(depth + 1);
                    SkipSpace();
                    if (!AtEnd && _s[_i] == ',') { _i++; continue; }
                    Expect('}');
                    return obj;
                }
            }

            List<object> Array(int depth)
            {
                var list = new List<object>();
                Expect('[');
                SkipSpace();
                if (!AtEnd && _s[_i] == ']') { _i++; return list; }
                while (true)
                {
                    list.Add(Value(depth + 1));
                    SkipSpace();
                    if (!AtEnd && _s[_i] == ',') { _i++; continue; }
                    Expect(']');
                    return list;
                }
            }

            string String()
            {
                _i++; // the opening quote
                var sb = new StringBuilder();
                while (true)
                {
                    if (AtEnd) throw Error("unterminated string");
                    char c = _s[_i++];
                    if (c == '"') return sb.ToString();
                    if (c < 0x20) throw Error("control character in a string");
                    if (c != '\\') { sb.Append(c); continue; }
                    if (AtEnd) throw Error("unterminated escape");
                    char e = _s[_i++];
                    switch (e)
                    {
                        case '"': sb.Append('"'); break;
                        case '\\': sb.Append('\\'); break;
                        case '/': sb.Append('/'); break;
                        case 'b': sb.Append('\b'); break;
                        case 'f': sb.Append('\f'); break;
                        case 'n': sb.Append('\n'); break;
                        case 'r': sb.Append('\r'); break;
                        case 't': sb.Append('\t'); break;
                        case 'u': sb.Append(Hex4()); break;
                        default: throw Error("unknown escape \\" + e);
                    }
                }
            }

            char Hex4()
            {
                int code;
                if (_i + 4 > _s.Length || !int.TryParse(_s.Substring(_i, 4), NumberStyles.AllowHexSpecifier,
                                                          CultureInfo.InvariantCulture, out code))
                    throw Error("bad \\u escape");
                _i += 4;
                return (char)code; // surrogate pairs arrive as two escapes and are appended in order
            }

            double Number()
            {
                int start = _i;
                if (_s[_i] == '-') _i++;
                if (AtEnd || _s[_i] < '0' || _s[_i] > '9') throw Error("bad number");
                if (_s[_i] == '0') _i++;
                else Digits();
                if (!AtEnd && _s[_i] == '.') { _i++; if (Digits() == 0) throw Error("bad fraction"); }
                if (!AtEnd && (_s[_i] == 'e' || _s[_i] == 'E'))
                {
                    _i++;
                    if (!AtEnd && (_s[_i] == '+' || _s[_i] == '-')) _i++;
                    if (Digits() == 0) throw Error("bad exponent");
                }
                return double.Parse(_s.Substring(start, _i - start), NumberStyles.Float, CultureInfo.InvariantCulture);
            }

            int Digits()
            {
                int start = _i;
                while (!AtEnd && _s[_i] >= '0' && _s[_i] <= '9') _i++;
                return _i - start;
            }
        }
    }
}
