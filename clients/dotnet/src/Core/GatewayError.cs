// The gateway's OpenAI-shaped error, {"error": {"message", "type", "param", "code"}}, as one exception
// that a caller can print or branch on. Bodies of another shape (a proxy's HTML page) keep their status.
using System;
using System.Collections.Generic;

namespace Gateway.Client
{
    public sealed class GatewayException : Exception
    {
        public ResponseInfo Response { get; private set; }
        public string Type { get; private set; }
        public string Code { get; private set; }
        public string Param { get; private set; }
        /// <summary>True when the error arrived as the last event of a stream that had already started.</summary>
        public bool MidStream { get; private set; }

        public int Status { get { return Response.Status; } }

        GatewayException(string message) : base(message) { }

        public static GatewayException FromBody(ResponseInfo response, string body, bool midStream)
        {
            object parsed = null;
            try { parsed = Json.Parse(body); }
            catch (JsonException) { }
            var error = Json.At(parsed, "error") as Dictionary<string, object>;
            string message = Json.At(error, "message") as string;
            if (message == null) message = "a response that is not the OpenAI error shape: " + Excerpt(body);
            return new GatewayException(message)
            {
                Response = response,
                Type = Json.At(error, "type") as string,
                Code = Json.At(error, "code") as string,
                Param = Json.At(error, "param") as string,
                MidStream = midStream,
            };
        }

        public static GatewayException Truncated(ResponseInfo response)
        {
            return new GatewayException("the stream ended without its final [DONE] event")
            {
                Response = response,
                MidStream = true,
            };
        }

        /// <summary>One line for a person: status, type and code, the gateway's message, what to do next.</summary>
        public string Describe()
        {
            string line = MidStream ? "stream failed after it started" : "HTTP " + Status;
            if (Type != null) line += " " + Type + (Code != null ? "/" + Code : "");
            line += ": " + Message;
            if (Param != null) line += " (param: " + Param + ")";
            if (Response.RetryAfter.HasValue) line += " (Retry-After: " + Response.RetryAfter.Value.TotalSeconds + " s)";
            if (Status == 401) line += " (check that the token is for the gateway's scope and has not expired)";
            if (Status == 403) line += " (the token carries no gateway role that allows this)";
            if (Response.RequestId != null) line += " [x-request-id " + Response.RequestId + "]";
            return line;
        }

        static string Excerpt(string body)
        {
            body = (body ?? "").Trim();
            return body.Length <= 200 ? body : body.Substring(0, 200) + "...";
        }
    }
}
