// gateway-client: calls the gateway's chat (whole and streamed), task and usage routes and prints what
// an enterprise caller needs to see, request ids and rate-limit headers included.
// Exit codes: 0 ok, 1 the gateway refused or failed, 2 bad usage or configuration, 3 the gateway was unreachable.
using System;
using System.Collections.Generic;
using System.IO;
using System.Net.Http;
using System.Threading;
using System.Threading.Tasks;

namespace Gateway.Client
{
    public static class Program
    {
        const string Usage =
            "usage: gateway-client [--url URL] [--model MODEL] [--task TASK] [--max-retries N] " +
            "chat|stream|generate|usage|all [PROMPT]\n" +
            "  URL: GATEWAY_URL, e.g. https://<apim>.azure-api.net/ai or http://127.0.0.1:7071/api\n" +
            "  token: GATEWAY_TOKEN or GATEWAY_TOKEN_FILE; otherwise DefaultAzureCredential for GATEWAY_SCOPE\n" +
            "  APIM_SUBSCRIPTION_KEY, when set, is sent as Ocp-Apim-Subscription-Key";

        public static int Main(string[] args)
        {
            Options options;
            try { options = Options.Parse(args); }
            catch (ArgumentException e)
            {
                Console.Error.WriteLine("error: " + e.Message + "\n" + Usage);
                return 2;
            }
            try { return RunAsync(options).GetAwaiter().GetResult(); }
            catch (GatewayException e)
            {
                Console.Out.Flush();
                Console.Error.WriteLine("error: " + e.Describe());
                foreach (KeyValuePair<string, string> header in e.Response.RateLimits())
                    Console.Error.WriteLine(header.Key + ": " + header.Value);
                return 1;
            }
            catch (HttpRequestException e)
            {
                Console.Error.WriteLine("error: could not reach the gateway at " + options.Url + ": " + e.Message);
                return 3;
            }
            catch (InvalidOperationException e)
            {
                Console.Error.WriteLine("error: " + e.Message);
                return 2;
            }
        }

        static async Task<int> RunAsync(Options options)
        {
            using (var client = new GatewayClient(options.Url, TokenSource(), Console.Error))
            {
                client.MaxRetries = options.MaxRetries;
                string key = Environment.GetEnvironmentVariable("APIM_SUBSCRIPTION_KEY");
                if (!string.IsNullOrEmpty(key)) client.ExtraHeaders["Ocp-Apim-Subscription-Key"] = key;
                var cancel = CancellationToken.None;
                bool all = options.Command == "all";
                if (all || options.Command == "chat") PrintChat(await client.ChatAsync(options.Model, options.Prompt, cancel));
                if (all || options.Command == "stream") await StreamAsync(client, options, cancel);
                if (all || options.Command == "generate")
                    PrintGenerate(await client.GenerateAsync(options.Task, options.Prompt, options.ModelOrNull, cancel));
                if (all || options.Command == "usage") PrintUsage(await client.UsageAsync(cancel));
                return 0;
            }
        }

        static ITokenSource TokenSource()
        {
            ITokenSource fromEnvironment = EnvironmentTokenSource.FromEnvironment();
            if (fromEnvironment != null) return fromEnvironment;
            string scope = Environment.GetEnvironmentVariable("GATEWAY_SCOPE");
            if (string.IsNullOrEmpty(scope))
                throw new InvalidOperationException("set GATEWAY_SCOPE (e.g. api://<gateway app id>/.default), " +
                                                    "or GATEWAY_TOKEN / GATEWAY_TOKEN_FILE");
#if AZURE_IDENTITY
            return new AzureIdentityTokenSource(scope);
#else
            throw new InvalidOperationException("this build has no Azure.Identity: set GATEWAY_TOKEN or GATEWAY_TOKEN_FILE");
#endif
        }

        static void PrintChat(Reply reply)
        {
            Section("chat", reply.Response);
            Field("model", Json.At(reply.Body, "model"));
            Field("finish_reason", Json.At(reply.Body, "choices", 0, "finish_reason"));
            PrintTokens(Json.At(reply.Body, "usage"));
            Field("content", Json.At(reply.Body, "choices", 0, "message", "content"));
        }

        static async Task StreamAsync(GatewayClient client, Options options, CancellationToken cancel)
        {
            Reply reply = await client.StreamChatAsync(options.Model, options.Prompt, info =>
            {
                Section("stream", info);
                Console.Write("content: ");
            }, delta =>
            {
                Console.Write(delta);
                Console.Out.Flush(); // each delta is on screen as it arrives
            }, cancel);
            Console.WriteLine();
            PrintTokens(Json.At(reply.Body, "usage"));
            Console.WriteLine("[done]");
        }

        static void PrintGenerate(Reply reply)
        {
            Section("generate", reply.Response);
            foreach (string name in new[] { "task", "provider", "model", "estimated_cost_usd", "request_id" })
                Field(name, Json.At(reply.Body, name));
            PrintTokens(Json.At(reply.Body, "usage"));
            Field("output", Json.At(reply.Body, "output"));
        }

        static void PrintUsage(Reply reply)
        {
            Section("usage", reply.Response);
            Field("caller", Json.At(reply.Body, "caller"));
            Field("tier", Json.At(reply.Body, "tier"));
            Field("status", Json.At(reply.Body, "status"));
            foreach (string period in new[] { "minute", "day", "month" })
            {
                var used = Json.At(reply.Body, period, "used") as Dictionary<string, object>;
                if (used == null) continue;
                var parts = new List<string>();
                foreach (string measure in used.Keys)
                    parts.Add(measure + " " + Json.Text(used[measure]) + " of " +
                              Json.Text(Json.At(reply.Body, period, "limit", measure)) + " (remaining " +
                              Json.Text(Json.At(reply.Body, period, "remaining", measure)) + ")");
                Field(period, string.Join(", ", parts) + ", resets " + Json.Text(Json.At(reply.Body, period, "resets_at")));
            }
        }

        static void Section(string name, ResponseInfo info)
        {
            Console.WriteLine("== " + name + " ==");
            Field("x-request-id", info.RequestId);
            foreach (KeyValuePair<string, string> header in info.Headers) Field(header.Key, header.Value);
        }

        static void PrintTokens(object usage)
        {
            if (usage == null) return;
            Field("tokens", "prompt " + Json.Text(Json.At(usage, "prompt_tokens")) + ", completion " +
                            Json.Text(Json.At(usage, "completion_tokens")) + ", total " +
                            Json.Text(Json.At(usage, "total_tokens")));
        }

        static void Field(string name, object value)
        {
            Console.WriteLine(name + ": " + Json.Text(value));
        }

        sealed class Options
        {
            public string Url = Environment.GetEnvironmentVariable("GATEWAY_URL") ?? "http://127.0.0.1:7071/api";
            public string Model = "gpt-4o-mini";
            public string ModelOrNull;
            public string Task = "summarise";
            public int MaxRetries = 2;
            public string Command;
            public string Prompt = "Say hello in five words.";

            public static Options Parse(string[] args)
            {
                var o = new Options();
                var rest = new List<string>();
                for (int i = 0; i < args.Length; i++)
                {
                    string value = i + 1 < args.Length ? args[i + 1] : null;
                    switch (args[i])
                    {
                        case "--url": o.Url = Required(args[i], value); i++; break;
                        case "--model": o.Model = o.ModelOrNull = Required(args[i], value); i++; break;
                        case "--task": o.Task = Required(args[i], value); i++; break;
                        case "--max-retries": o.MaxRetries = Count(args[i], Required(args[i], value)); i++; break;
                        default: rest.Add(args[i]); break;
                    }
                }
                if (rest.Count == 0) throw new ArgumentException("no command");
                o.Command = rest[0];
                if (Array.IndexOf(new[] { "chat", "stream", "generate", "usage", "all" }, o.Command) < 0)
                    throw new ArgumentException("unknown command '" + o.Command + "'");
                if (rest.Count > 1) o.Prompt = string.Join(" ", rest.GetRange(1, rest.Count - 1));
                return o;
            }

            static string Required(string flag, string value)
            {
                if (value == null) throw new ArgumentException(flag + " needs a value");
                return value;
            }

            static int Count(string flag, string value)
            {
                int n;
                if (!int.TryParse(value, out n) || n < 0) throw new ArgumentException(flag + " needs a whole number >= 0");
                return n;
            }
        }
    }
}
